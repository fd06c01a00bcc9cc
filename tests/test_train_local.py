"""The single-process training job (imgcap/train/local.py, `imgcap train`): both phases, self-critical
training started from a bundle, and the dev report of the saved bundle; on the toy problem written to disk
as a Flickr8k-style caption file, split files and an .npz of features (tests/toy.py)."""

from __future__ import annotations

import json

import pytest
from toy import write_toy_job_files

from imgcap.config.loader import ConfigError, config_from_dict
from imgcap.config.model import DecodeConfig
from imgcap.config.training import TrainJobConfig
from imgcap.data.dataset import prepare_training_data
from imgcap.metrics.evaluate import evaluate_captions
from imgcap.model.bundle import load_bundle
from imgcap.train.local import train_captioner


@pytest.fixture(scope="module")
def toy_job_files(tmp_path_factory):
    return write_toy_job_files(tmp_path_factory.mktemp("toy_job"))


def toy_job(files, output_dir, **tables) -> TrainJobConfig:
    table = {"data": dict(files), "output_dir": str(output_dir), "text": {"min_count": 1, "max_length": 20},
             "model": {"embedding_dim": 32, "units": 64, "dropout": 0.1},
             "train": {"epochs": 2, "batch_size": 32, "learning_rate": 3e-3, "patience": 0},
             "decode": {"beam_width": 1, "max_length": 20}}
    for name, values in tables.items():
        table[name] = {**table.get(name, {}), **values}
    return config_from_dict(TrainJobConfig, table)


def test_train_job_runs_both_phases_and_starts_from_a_bundle(toy_job_files, tmp_path):
    scst = {"enabled": True, "epochs": 2, "samples": 3, "batch_size": 30, "learning_rate": 1e-3}
    both = train_captioner(toy_job(toy_job_files, tmp_path / "both", scst=scst), progress=False)
    assert [(h.phase, h.epoch) for h in both.history] == [("xe", 1), ("xe", 2), ("scst", 1), ("scst", 2)]
    bundle = load_bundle(both.bundle_path)
    assert bundle.provenance["phases"] == ["xe", "scst"] and bundle.provenance["phase"] == "scst"
    assert all(h["train_reward"] > 0 for h in bundle.provenance["history"][2:])

    # Self-critical training started from a bundle (here the one just trained): no cross-entropy epochs.
    started = train_captioner(toy_job(toy_job_files, tmp_path / "from_bundle",
                                      scst={**scst, "init_from": str(both.bundle_path)}), progress=False)
    assert [h.phase for h in started.history] == ["scst", "scst"]
    assert load_bundle(started.bundle_path).provenance["init_from"] == str(both.bundle_path)
    with pytest.raises(ConfigError, match=r"model.units is 32 but scst.init_from .* was trained with 64"):
        train_captioner(toy_job(toy_job_files, tmp_path / "bad", model={"units": 32},
                                scst={**scst, "init_from": str(both.bundle_path)}), progress=False)
    with pytest.raises(ConfigError, match="neither a bundle"):
        train_captioner(toy_job(toy_job_files, tmp_path / "bad", scst={**scst, "init_from": str(tmp_path)}),
                        progress=False)


def test_dev_report_scores_the_bundles_own_decoding(toy_job_files, tmp_path):
    """dev_report.json holds the scores of the captions the bundle makes with its decoding (beam-3 here), not
    of the greedy captions the epochs' dev evaluation makes."""
    config = toy_job(toy_job_files, tmp_path / "beam", decode={"beam_width": 3, "length_penalty": 1.0})
    train_captioner(config, progress=False)
    bundle = load_bundle(tmp_path / "beam" / "bundle")
    data = prepare_training_data(config.data, config.text, bundle.vocab)
    dev = data.features.select(data.dev_ids).features
    beam, greedy = bundle.caption(dev), bundle.caption(dev, DecodeConfig(beam_width=1, max_length=20))
    assert beam != greedy  # else this test could not tell the two apart

    def bleu(captions: list[list[str]]) -> list[float]:
        return evaluate_captions(data.dev_references, dict(zip(data.dev_ids, captions)), split="dev",
                                 text_mode="standard", decoding="", coco=False).nltk_bleu

    report = json.loads((tmp_path / "beam" / "dev_report.json").read_text())
    assert report["decoding"] == "beam-3 (length penalty 1)"
    assert report["nltk_bleu"] == pytest.approx(bleu(beam), abs=1e-12)
