"""The main job end to end on the embedded demo data, and the captioning job's edge cases (real Ray)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imgcap.batch.caption import run_caption_job
from imgcap.batch.caption_outputs import CAPTION_SCHEMA
from imgcap.batch.pipeline import load_pipeline_config, run_pipeline
from imgcap.captioner import Captioner
from imgcap.config.jobs import CaptionJobConfig, CnnConfig, SourceConfig
from imgcap.config.loader import ConfigError
from imgcap.config.model import DecodeConfig
from imgcap.data.feature_table import load_features
from imgcap.io.outputs import OutputDirectory
from imgcap.io.storage import S3Options
from imgcap.metrics.evaluate import nltk_corpus_bleu
from imgcap.model.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[1]


def read_captions_output(directory: Path):
    """Every caption row written to `directory`; fails on a duplicate image id."""
    table = OutputDirectory(str(directory), S3Options()).read(CAPTION_SCHEMA)
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)), "duplicate caption rows"
    return table


@pytest.fixture(scope="module")
def demo_run(ray_local, tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    config = load_pipeline_config(ROOT / "configs" / "demo.toml", {
        "work_dir": str(work), "demo_images": 200, "train.train.epochs": 6})
    return config, run_pipeline(config)


def test_demo_pipeline_captions_dev_images_better_than_chance(demo_run):
    config, result = demo_run
    assert result.extraction.ok == 200 and result.extraction.failed == 0
    captions = read_captions_output(Path(config.caption.output_dir) / "captions")
    dev_ids = {line.strip().rsplit(".", 1)[0] for line in open(config.caption.split) if line.strip()}
    assert set(captions["image_id"].to_pylist()) == dev_ids  # every dev image, once, nothing else
    assert captions["caption"].null_count == 0
    assert all(s.endswith(".jpg") for s in captions["source"].to_pylist())  # each row traces to its file
    report = result.captions.report
    # Chance: each image scored against the references of another image.
    per_image = pq.read_table(Path(config.caption.output_dir) / "report.parquet").to_pylist()
    refs = [r["references"] for r in per_image]
    hyps = [r["caption"].split() for r in per_image]
    shuffled = nltk_corpus_bleu([[x.split() for x in rs] for rs in refs[1:] + refs[:1]], hyps)[3]
    assert report.nltk_bleu[3] > shuffled + 0.05
    assert report.coco and 0 < report.coco["bleu4"] <= 1


def test_bundle_records_its_provenance(demo_run):
    config, result = demo_run
    bundle = load_bundle(result.training.bundle_path)
    assert bundle.backbone == "thumbnail"
    assert bundle.provenance["train_job"]["data"]["captions"] == config.train.data.captions
    assert len(bundle.provenance["history"]) == len(result.training.history)


def test_caption_job_keeps_error_rows_and_restricts_to_a_split(demo_run, tmp_path):
    config, result = demo_run
    features = tmp_path / "features"
    shutil.copytree(config.extract.output_dir, features)
    table = pq.read_table(features)
    # An extraction error row (no feature) must come out as a row with the error and no caption.
    broken = table.slice(0, 1).to_pylist()[0] | {"image_id": "broken", "feature": None, "error": "truncated"}
    pq.write_table(table.from_pylist([broken], schema=table.schema), features / "broken.parquet")
    split = tmp_path / "split.txt"
    split.write_text("broken.jpg\nshapes_00001.jpg\nshapes_00002.jpg\n")
    job = CaptionJobConfig(bundle=str(result.training.bundle_path), features=str(features),
                           output_dir=str(tmp_path / "out"), split=str(split), references=config.caption.references)
    out = run_caption_job(job)
    rows = {r["image_id"]: r for r in read_captions_output(tmp_path / "out" / "captions").to_pylist()}
    assert set(rows) == {"broken", "shapes_00001", "shapes_00002"}
    assert rows["broken"]["caption"] is None and rows["broken"]["error"] == "truncated"
    assert rows["shapes_00001"]["caption"] and rows["shapes_00001"]["score"] < 0
    assert (out.listed, out.skipped, out.captioned, out.failed) == (3, 0, 2, 1) and out.report.num_images == 2
    again = run_caption_job(job)  # a rerun resumes: nothing left to do, nothing duplicated
    assert (again.listed, again.skipped, again.captioned, again.failed) == (3, 3, 0, 0)
    assert again.report.num_images == 2 and read_captions_output(tmp_path / "out" / "captions").num_rows == 3
    other = CaptionJobConfig(bundle=job.bundle, features=job.features, output_dir=job.output_dir,
                             decode=DecodeConfig(beam_width=1))
    with pytest.raises(FileExistsError, match="not 'greedy'"):  # captions of another decoding are never mixed in
        run_caption_job(other)


def test_images_to_captions_matches_the_features_path(demo_run, tmp_path):
    """The one streaming job from images gives the captions of extraction + caption job, with the bundle's
    recorded embedding, thumbnails for the contact sheet, and one row per image, errors included."""
    config, result = demo_run
    images = Path(config.extract.sources[0].path)
    split = tmp_path / "split.txt"
    split.write_text("".join(f"shapes_{i:05d}.jpg\n" for i in range(8)) + "empty.jpg\n")
    photos = tmp_path / "photos"
    shutil.copytree(images, photos, ignore=lambda d, names: [n for n in names if n[7:12] > "00007"])
    (photos / "empty.jpg").write_bytes(b"")
    from_images = run_caption_job(CaptionJobConfig(
        bundle=str(result.training.bundle_path), sources=[SourceConfig(str(photos))], output_dir=str(tmp_path / "a"),
        references=config.caption.references, split=str(split), cnn=CnnConfig(weights="none"), thumbnail_size=48))
    from_features = run_caption_job(CaptionJobConfig(
        bundle=str(result.training.bundle_path), features=config.extract.output_dir, output_dir=str(tmp_path / "b"),
        split=str(split)))
    a = {r["image_id"]: r for r in read_captions_output(tmp_path / "a" / "captions").to_pylist()}
    b = {r["image_id"]: r for r in read_captions_output(tmp_path / "b" / "captions").to_pylist()}
    assert set(a) == {f"shapes_{i:05d}" for i in range(8)} | {"empty"} and set(b) == set(a) - {"empty"}
    assert a["empty"]["caption"] is None and a["empty"]["error"].startswith("empty file")
    assert all(a[i]["caption"] == b[i]["caption"] for i in b), [(a[i]["caption"], b[i]["caption"]) for i in b]
    assert all(a[i]["thumbnail"][:2] == b"\xff\xd8" and b[i]["thumbnail"] is None for i in b)  # JPEG thumbnails
    assert a["shapes_00000"]["source"] == str(photos / "shapes_00000.jpg")
    assert (from_images.listed, from_images.captioned, from_images.failed) == (9, 8, 1)
    assert from_features.listed == 8 and from_images.report.num_images == 8
    html = (tmp_path / "a" / "report.html").read_text()
    assert all(f"shapes_{i:05d}" in html for i in range(8)) and "empty file" in html
    assert "report.html" in from_images.format() and "report.parquet" in from_images.format()


def test_the_captioner_matches_the_batch_job(demo_run):
    config, result = demo_run
    images = Path(config.extract.sources[0].path)
    photos = [str(images / "shapes_00003.jpg"), str(images / "missing.jpg")]
    single = Captioner.load(result.training.bundle_path, weights=None).caption(photos)
    assert single[1].caption is None and "No such file" in single[1].error
    table = load_features(config.extract.output_dir).select(["shapes_00003"])
    assert single[0].caption == " ".join(load_bundle(result.training.bundle_path).caption(table.features)[0])


def test_pipeline_config_errors_name_the_stage_key(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('demo_images = 10\n[train.train]\nepochs = 0\n')
    with pytest.raises(ConfigError, match=r"p.toml: train.train.epochs must be >= 1"):
        load_pipeline_config(bad)
    bad.write_text('images = "x"\n')
    with pytest.raises(ConfigError, match="captions required"):
        load_pipeline_config(bad)


@pytest.mark.subprocess
def test_job_entrypoint_exits_2_on_a_config_error(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('demo_images = 10\n[extract]\nbackbone = "alexnet"\n')
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "backbone must be one of" in proc.stderr


def test_an_empty_source_captions_nothing_and_says_so(demo_run, tmp_path):
    _, result = demo_run
    (tmp_path / "empty").mkdir()
    out = run_caption_job(CaptionJobConfig(bundle=str(result.training.bundle_path),
                                           sources=[SourceConfig(str(tmp_path / "empty"))],
                                           output_dir=str(tmp_path / "out"), cnn=CnnConfig(weights="none")))
    assert (out.listed, out.skipped, out.captioned, out.failed, out.missing) == (0, 0, 0, 0, 0)
    assert "images 0" in out.format() and (tmp_path / "out" / "report.html").is_file()
