"""The main job end to end on the embedded demo data, and the captioning job's edge cases (real Ray)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imgcap.bundle import load_bundle
from imgcap.config import CaptionJobConfig, ConfigError
from imgcap.evaluate import nltk_corpus_bleu
from imgcap.features import load_features
from imgcap.inference import caption_photos, run_caption_job
from imgcap.pipeline import load_pipeline_config, run_pipeline
from imgcap.sinks import read_captions_output

ROOT = Path(__file__).resolve().parents[1]


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
    bundle = load_bundle(result.training.bundle_dir)
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
    job = CaptionJobConfig(bundle=str(result.training.bundle_dir), features=str(features),
                           output_dir=str(tmp_path / "out"), split=str(split), references=config.caption.references)
    out = run_caption_job(job)
    rows = {r["image_id"]: r for r in read_captions_output(tmp_path / "out" / "captions").to_pylist()}
    assert set(rows) == {"broken", "shapes_00001", "shapes_00002"}
    assert rows["broken"]["caption"] is None and rows["broken"]["error"] == "truncated"
    assert rows["shapes_00001"]["caption"] and rows["shapes_00001"]["score"] < 0
    assert (out.images, out.captioned, out.failed) == (3, 2, 1) and out.report.num_images == 2
    with pytest.raises(FileExistsError, match="already holds captions"):
        run_caption_job(job)


def test_caption_photos_matches_the_batch_job(demo_run):
    config, result = demo_run
    images = Path(config.extract.sources[0].path)
    photos = [str(images / "shapes_00003.jpg"), str(images / "missing.jpg")]
    single = caption_photos(result.training.bundle_dir, photos, weights=None)
    assert single[1].caption is None and "No such file" in single[1].error
    table = load_features(config.extract.output_dir).select(["shapes_00003"])
    assert single[0].caption == " ".join(load_bundle(result.training.bundle_dir).caption(table.features)[0])


def test_pipeline_config_errors_name_the_stage_key(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('demo_images = 10\n[train.train]\nepochs = 0\n')
    with pytest.raises(ConfigError, match=r"p.toml: train.train.epochs must be >= 1"):
        load_pipeline_config(bad)
    bad.write_text('images = "x"\n')
    with pytest.raises(ConfigError, match="captions required"):
        load_pipeline_config(bad)


def test_job_entrypoint_exits_2_on_a_config_error(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('demo_images = 10\n[extract]\nbackbone = "alexnet"\n')
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "backbone must be one of" in proc.stderr
