"""S3 sources against a real S3 API: moto's server on 127.0.0.1, filled with boto3, read by imgcap."""

from __future__ import annotations

import io
import tarfile
import zipfile

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from _imaging import jpeg_bytes, thumbnail

from imgcap.batch.extract import extract_features
from imgcap.config.jobs import ExtractConfig
from imgcap.config.loader import config_from_dict
from imgcap.io.sources import SourceError, list_source, plan_shards, read_shard
from imgcap.io.storage import S3Options

BUCKET = "imgcap-test"


def tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bucket(s3_server):
    """A bucket with loose images, a lookalike prefix, junk, archives and a list file; returns the objects."""
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=BUCKET)
    objects = {
        "photos/a.jpg": jpeg_bytes(1),
        "photos/sub/b.JPG": jpeg_bytes(2),
        "photos/notes.txt": b"not an image",
        "photos/broken.jpg": b"plain text with a .jpg name",
        "photos2/c.jpg": jpeg_bytes(3),
        "archives/part.tar": tar_bytes({f"t/{i}.jpg": jpeg_bytes(10 + i) for i in range(3)}, "w"),
        "archives/part.tar.gz": tar_bytes({f"g/{i}.jpg": jpeg_bytes(20 + i) for i in range(3, 6)}, "w:gz"),
        "archives/part.zip": zip_bytes({f"z/{i}.jpg": jpeg_bytes(30 + i) for i in range(6, 9)}),
        "lists/some.txt": b"# relative to the list's prefix, or absolute\n../photos/a.jpg\ns3://imgcap-test/photos2/c.jpg\n",
    }
    for key, data in objects.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
    return objects


def read_all(refs, options):
    out = {}
    for shard in plan_shards(refs, 2):
        for chunk in read_shard(shard, options):
            out.update({raw.image_id: (raw.data, raw.error) for raw in chunk})
    return out


def test_prefix_listing_is_a_directory_recursive_and_by_extension(s3_server, bucket):
    options = S3Options(endpoint_url=s3_server)
    refs = list_source(f"s3://{BUCKET}/photos", options)
    assert sorted(r.source for r in refs) == [f"s3://{BUCKET}/photos/a.jpg", f"s3://{BUCKET}/photos/broken.jpg",
                                              f"s3://{BUCKET}/photos/sub/b.JPG"]
    flat = list_source(f"s3://{BUCKET}/photos/", options, recursive=False)
    assert sorted(r.image_id for r in flat) == ["a", "broken"]
    got = read_all(refs, options)
    assert got["a"] == (bucket["photos/a.jpg"], "") and got["b"] == (bucket["photos/sub/b.JPG"], "")
    single = list_source(f"s3://{BUCKET}/photos2/c.jpg", options)
    assert [(r.image_id, r.location) for r in single] == [("c", f"s3://{BUCKET}/photos2/c.jpg")]


def test_endpoint_from_the_environment_like_any_boto3_user(s3_server, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    refs = list_source(f"s3://{BUCKET}/photos2", S3Options())
    assert read_all(refs, S3Options()) == {"c": (bucket["photos2/c.jpg"], "")}


@pytest.mark.parametrize(("key", "ids"), [("archives/part.tar", ["0", "1", "2"]),
                                          ("archives/part.tar.gz", ["3", "4", "5"]),
                                          ("archives/part.zip", ["6", "7", "8"])])
def test_archives_on_s3_are_read_in_place(s3_server, bucket, key, ids):
    options = S3Options(endpoint_url=s3_server)
    refs = list_source(f"s3://{BUCKET}/{key}", options)
    assert [r.image_id for r in refs] == ids
    got = read_all(refs, options)
    member = {"archives/part.tar": "t", "archives/part.tar.gz": "g", "archives/part.zip": "z"}[key]
    with (tarfile.open(fileobj=io.BytesIO(bucket[key])) if key.endswith(("tar", "gz"))
          else zipfile.ZipFile(io.BytesIO(bucket[key]))) as archive:
        for image_id in ids:
            name = f"{member}/{image_id}.jpg"
            expected = archive.extractfile(name).read() if hasattr(archive, "extractfile") else archive.read(name)
            assert got[image_id] == (expected, "")


def test_list_file_on_s3_and_prefix_with_archives(s3_server, bucket):
    options = S3Options(endpoint_url=s3_server)
    refs = list_source(f"s3://{BUCKET}/lists/some.txt", options)
    assert [r.location for r in refs] == [f"s3://{BUCKET}/photos/a.jpg", f"s3://{BUCKET}/photos2/c.jpg"]
    with_archives = list_source(f"s3://{BUCKET}/archives", options, include_archives=True)
    assert sorted(r.image_id for r in with_archives) == [str(i) for i in range(9)]


def test_missing_objects_and_buckets(s3_server, bucket):
    options = S3Options(endpoint_url=s3_server)
    missing = list_source(f"s3://{BUCKET}/photos/gone.jpg", options)  # a single key is not checked up front
    (data, error), = read_all(missing, options).values()
    assert data is None and error.startswith("unreadable: FileNotFoundError") and "photos/gone.jpg" in error
    with pytest.raises(SourceError, match="cannot list s3://no-such-bucket/x"):
        list_source("s3://no-such-bucket/x", options)


def test_full_extraction_from_s3(ray_local, s3_server, bucket, tmp_path):
    config = config_from_dict(ExtractConfig, {
        "sources": [{"path": f"s3://{BUCKET}/photos"}, {"path": f"s3://{BUCKET}/archives/part.tar.gz"}],
        "output_dir": str(tmp_path / "out"), "backbone": "thumbnail", "s3": {"endpoint_url": s3_server},
    })
    summary = extract_features(config)
    assert (summary.listed, summary.ok, summary.failed) == (6, 5, 1)
    table = {r["image_id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert table["broken"]["error"].startswith("not an image") and table["broken"]["feature"] is None
    np.testing.assert_allclose(table["a"]["feature"], thumbnail(bucket["photos/a.jpg"]), atol=1e-5)
    assert table["4"]["source"] == f"s3://{BUCKET}/archives/part.tar.gz!g/4.jpg"
    again = extract_features(config)
    assert (again.skipped, again.ok) == (6, 0)
