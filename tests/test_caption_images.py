"""The bulk captioning job from images on a local Ray cluster: agreement of the three ways to caption a photo
(one streaming job from images, extraction + caption job on the features, `imgcap caption`) on the shared
Flickr8k images, and a run from a `.tar.gz` on S3 (moto's server) to `s3://` outputs that resumes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from _imaging import SHARED, jpeg_bytes

from imgcap.batch.caption import run_caption_job
from imgcap.batch.caption_outputs import CAPTION_SCHEMA
from imgcap.batch.extract import extract_features
from imgcap.captioner import Captioner
from imgcap.config.jobs import (
    CaptionJobConfig,
    CnnConfig,
    ExtractConfig,
    S3Config,
    SourceConfig,
)
from imgcap.config.loader import config_from_dict
from imgcap.config.training import TrainJobConfig
from imgcap.io.outputs import OutputDirectory
from imgcap.io.storage import S3Options
from imgcap.model.bundle import load_bundle
from imgcap.testing.fixtures import untrained_bundle
from imgcap.vision.spec import EmbeddingSpec

FLICKR = SHARED / "flickr8k"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
needs_shared = pytest.mark.skipif(not (FLICKR / "Images").is_dir() or not WEIGHTS.is_file(),
                                  reason=f"the shared Flickr8k images and MobileNetV2 weights are not in {SHARED}")


def caption_rows(output: OutputDirectory) -> dict[str, dict]:
    """Every caption row by image id; fails on a duplicate."""
    table = output.read(CAPTION_SCHEMA)
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)), "duplicate caption rows"
    return {row["image_id"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def flickr_bundle(tmp_path_factory):
    """A small merge decoder trained briefly on the shared MobileNetV2 features (its captions need only be
    deterministic here, not good), with the embedding the shared features were made with."""
    from imgcap.train.local import train_captioner

    out = tmp_path_factory.mktemp("flickr_bundle")
    config = config_from_dict(TrainJobConfig, {
        "output_dir": str(out),
        "data": {"captions": str(FLICKR / "Flickr8k.token.txt"), "features": str(FLICKR / "features_mobilenet_v2.npz"),
                 "train_split": str(FLICKR / "Flickr_8k.trainImages.txt"),
                 "dev_split": str(FLICKR / "Flickr_8k.devImages.txt"), "backbone": "mobilenet_v2",
                 "max_train_images": 500, "max_dev_images": 100},
        "model": {"embedding_dim": 64, "units": 128},
        "train": {"epochs": 1, "batch_size": 128, "select_by": "loss"},
        "decode": {"beam_width": 3}})
    return train_captioner(config, progress=False).bundle_path


@needs_shared
def test_the_job_loads_the_cnn_weights_file_and_captions_as_the_captioner(ray_local, flickr_bundle, tmp_path):
    """A MobileNetV2 bundle with the shared Keras weights file (`cnn.weights_file`) through the bulk job from a
    list file of 30 shared photos, against `imgcap.Captioner` with the same file. (The packaged model's images,
    features and Captioner paths on the shared dev photos: tests/test_pretrained.py.)"""
    bundle = load_bundle(flickr_bundle)
    assert bundle.embedding == EmbeddingSpec("mobilenet_v2")  # recorded at training: stretch, nearest, avg
    photos = sorted((FLICKR / "Images").glob("*.jpg"))[:30]
    listed = tmp_path / "photos.txt"
    listed.write_text("".join(f"{p}\n" for p in photos), encoding="utf-8")

    from_images = run_caption_job(CaptionJobConfig(
        bundle=str(flickr_bundle), sources=[SourceConfig(str(listed))], output_dir=str(tmp_path / "a"),
        cnn=CnnConfig(weights_file=str(WEIGHTS)), references=str(FLICKR / "Flickr8k.token.txt")))
    single = {Path(p.source).stem: p.caption
              for p in Captioner.load(flickr_bundle, weights=str(WEIGHTS)).caption([str(p) for p in photos])}

    a = caption_rows(OutputDirectory(str(tmp_path / "a" / "captions"), S3Options()))
    assert set(a) == set(single) == {p.stem for p in photos}
    assert (from_images.captioned, from_images.failed, from_images.report.num_images) == (30, 0, 30)
    assert sum(a[i]["caption"] != single[i] for i in a) <= 1  # float rounding between CNN batches at most
    assert all(a[i]["source"] == str(FLICKR / "Images" / f"{i}.jpg") for i in a)


def test_tar_gz_on_s3_to_s3_outputs_then_rerun_duplicates_nothing(ray_local, s3_server, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="bulk")
    members = {f"batch/img{i:03d}.jpg": jpeg_bytes(seed=i, width=80, height=60) for i in range(40)}
    members["batch/broken.jpg"] = b"not a jpeg"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    client.put_object(Bucket="bulk", Key="in/part-0000.tar.gz", Body=buffer.getvalue())
    references = tmp_path / "captions.txt"  # Kaggle layout: image,caption
    references.write_text("image,caption\n" + "".join(f"img{i:03d}.jpg,a red dog\n" for i in range(0, 40, 2)))

    bundle = untrained_bundle(tmp_path / "bundle")  # the bundle is on S3 too: each caption actor fetches it
    for path in sorted(Path(bundle).iterdir()):
        client.put_object(Bucket="bulk", Key=f"bundles/tiny/{path.name}", Body=path.read_bytes())
    config = CaptionJobConfig(bundle="s3://bulk/bundles/tiny",
                              sources=[SourceConfig("s3://bulk/in/part-0000.tar.gz")], output_dir="s3://bulk/out/run1", references=str(references), rows_per_file=16,
                              actors=1, cnn=CnnConfig(weights="none"), s3=S3Config(endpoint_url=s3_server))
    first = run_caption_job(config)
    assert (first.listed, first.skipped, first.captioned, first.failed, first.missing) == (41, 0, 40, 1, 0)
    captions = OutputDirectory("s3://bulk/out/run1/captions", S3Options(endpoint_url=s3_server))
    rows = caption_rows(captions)
    assert rows["broken"]["caption"] is None and rows["broken"]["error"].startswith("not an image")
    assert rows["img007"]["source"] == "s3://bulk/in/part-0000.tar.gz!batch/img007.jpg"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="bulk", Prefix="out/run1/")["Contents"]}
    assert {"out/run1/report.parquet", "out/run1/scores.parquet", "out/run1/scores.json",
            "out/run1/report.html"} <= keys
    assert len([k for k in keys if k.startswith("out/run1/captions/")]) >= 3  # 41 rows, at most 16 per file
    report = pq.read_table(io.BytesIO(client.get_object(Bucket="bulk", Key="out/run1/report.parquet")["Body"].read()))
    assert report.num_rows == 20 and first.report.num_images == 20
    html = client.get_object(Bucket="bulk", Key="out/run1/report.html")["Body"].read().decode()
    assert html.count("data:image/jpeg;base64,") == 40 and "img039" in html

    again = run_caption_job(config)  # the same command again: everything is done, nothing is duplicated
    assert (again.listed, again.skipped, again.captioned, again.failed) == (41, 41, 0, 0)
    assert caption_rows(captions) == rows


def test_an_attention_bundle_captions_images_as_it_captions_their_grids(ray_local, tmp_path):
    """From images the captioner actor hands the CNN's whole grid to the attention decoder: the same captions
    as extracting the grids (pooling "none") and captioning that features table."""
    images = tmp_path / "images"
    images.mkdir()
    for k in range(12):
        (images / f"img{k:02d}.jpg").write_bytes(jpeg_bytes(seed=k, width=80 + 8 * k, height=60))
    bundle = untrained_bundle(tmp_path / "bundle", architecture="attention")
    assert load_bundle(bundle).model.regions == 256  # the thumbnail's 16 x 16 cells

    from_images = run_caption_job(CaptionJobConfig(
        bundle=bundle, sources=[SourceConfig(str(images))], output_dir=str(tmp_path / "a"),
        cnn=CnnConfig(weights="none", batch_size=5)))
    extract_features(ExtractConfig(sources=[SourceConfig(str(images))], output_dir=str(tmp_path / "grids"),
                                   backbone="thumbnail", pooling="none", weights="none", feature_dtype="float16"))
    from_grids = run_caption_job(CaptionJobConfig(bundle=bundle, features=str(tmp_path / "grids"),
                                                  output_dir=str(tmp_path / "b")))
    a = caption_rows(OutputDirectory(str(tmp_path / "a" / "captions"), S3Options()))
    b = caption_rows(OutputDirectory(str(tmp_path / "b" / "captions"), S3Options()))
    assert from_images.captioned == from_grids.captioned == 12 and a.keys() == b.keys()
    assert all(a[i]["caption"] == b[i]["caption"] for i in a)
    assert len({row["caption"] for row in a.values()}) > 1  # the captions depend on the image
