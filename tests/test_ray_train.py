"""The Ray Train job (imgcap/train/ray_job.py, jobs/train.py): data-parallel training on the local 2-CPU Ray
cluster.

The toy captioning problem is written to disk as a Flickr8k-style caption file, split files and an .npz of
features, so the job reads real files exactly as jobs/train.py does. Starting a Ray Train worker group costs
far more than the toy epochs, so three module-scoped runs serve every test that trains:
- 2 workers, compared with the single-process job (`imgcap train`) on the same data and global batch;
- 1 worker started (ray.resume_from) from the 2-worker run with its storage in S3 (moto's server), crashed in
  the middle of an epoch with ray.max_failures = 0 and run again as the same job, which continues its run;
- the attention decoder on 2 workers through both phases, a worker crashed in the self-critical phase and the
  worker group restarted by Ray Train from the last checkpoint.
Config errors are refused before any worker, actor or Ray Train run exists.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import nothing_started_on
from toy import write_toy_job_files

from imgcap.config.loader import ConfigError, config_from_dict
from imgcap.config.training import TrainJobConfig

EPOCHS, BATCH, LR, DECAY = 6, 32, 1e-2, 0.8


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory) -> dict[str, str]:
    return write_toy_job_files(tmp_path_factory.mktemp("toy_data"))


def job_config(files: dict[str, str], output_dir: Path, **tables) -> TrainJobConfig:
    table = {
        "data": dict(files),
        "output_dir": str(output_dir),
        "text": {"min_count": 1, "max_length": 20},
        "model": {"embedding_dim": 32, "units": 64, "dropout": 0.1},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "learning_rate": LR, "lr_decay": DECAY, "patience": 0,
                  "select_by": "loss"},
        "decode": {"beam_width": 1, "max_length": 20},
        "ray": {"num_workers": 2, "max_failures": 2},
    }
    for name, values in tables.items():
        table[name] = {**table.get(name, {}), **values}
    return config_from_dict(TrainJobConfig, table)


@pytest.fixture(scope="module")
def two_workers(ray_local, toy_files, tmp_path_factory):
    """2 workers (2 x 16 images a step), 6 epochs."""
    from imgcap.train.ray_job import train_on_ray

    return train_on_ray(job_config(toy_files, tmp_path_factory.mktemp("two_workers") / "out"))


@pytest.fixture(scope="module")
def single_process(toy_files, tmp_path_factory):
    """The same job in this process (`imgcap train`, 32 images a step): the reference of the 2-worker run."""
    from imgcap.train.local import train_captioner

    return train_captioner(job_config(toy_files, tmp_path_factory.mktemp("single_process") / "out"),
                           progress=False)


def test_two_workers_lower_the_loss_and_write_the_bundle(two_workers):
    from imgcap.model.bundle import load_bundle

    result = two_workers
    dev = [h.dev_loss for h in result.history]
    train = [h.train_loss for h in result.history]
    assert dev[-1] < 0.6 * dev[0] and train[-1] < 0.6 * train[0]  # learning went on over the epochs
    assert result.best_epoch == int(np.argmin(dev)) + 1
    bundle = load_bundle(result.bundle_path)  # what the captioning job loads
    assert bundle.provenance["best_epoch"] == result.best_epoch and bundle.provenance["ray_run"] == result.run_dir
    output = result.bundle_path.parent
    assert (output / "history.csv").read_text().count("\n") == EPOCHS + 1
    assert json.loads((output / "dev_report.json").read_text())["nltk_bleu"][0] > 0.8
    assert result.metrics["world_size"] == 2 and result.metrics["epoch"] == EPOCHS
    run = Path(result.run_dir)
    assert result.checkpoint == str(run / f"checkpoint_epoch_{EPOCHS:04d}")  # the latest is always kept
    assert len(list(run.glob("checkpoint_epoch_*"))) <= 3  # ray.checkpoints_to_keep = 2 best + latest
    for k, h in enumerate(result.history):  # the learning-rate schedule, epoch by epoch
        assert h.learning_rate == pytest.approx(LR * DECAY ** k, rel=1e-5)


def test_two_workers_match_one_process_on_the_same_global_batch(two_workers, single_process):
    """Same data, same global batch (2 x 16 vs 32) and steps per epoch. The runs cannot be identical: batches
    are length-bucketed per shard, dropout masks and summation order differ. Five single-process runs of this
    problem at these settings that differ only in the seed reach best dev losses of 0.409-0.420 in 6 epochs (a
    3% spread), so the best dev losses must agree within 10%."""
    two, one = two_workers, single_process
    assert [h.epoch for h in one.history] == [h.epoch for h in two.history] == list(range(1, EPOCHS + 1))
    assert [h.steps for h in one.history] == [h.steps for h in two.history] == [math.ceil(240 * 5 / BATCH)] * EPOCHS
    best_two = min(h.dev_loss for h in two.history)
    best_one = min(h.dev_loss for h in one.history)
    assert abs(best_two - best_one) / best_one < 0.10, (best_two, best_one)
    assert one.history[0].dev_loss > 1.5 * best_one and two.history[0].dev_loss > 1.5 * best_two


BUCKET = "imgcap-runs"
MORE = EPOCHS + 2  # the resumed run's train.epochs


@pytest.fixture(scope="module")
def resumed_in_s3(ray_local, s3_server, toy_files, two_workers, tmp_path_factory):
    """1 worker: a new run started (ray.resume_from) from the 2-worker run's output for 2 more epochs, its
    storage in S3 (ray.storage_path = s3://imgcap-runs/ray on the moto endpoint), ray.max_failures = 0. Run as
    one job twice: the first run crashes in the middle of its second epoch (epoch 8) and fails, its epoch-7
    checkpoint left in the bucket; the second, the same job again, continues that run to the end."""
    import boto3

    from imgcap.train.ray_job import train_on_ray
    from imgcap.train.ray_worker import FAIL_ONCE_ENV

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    root = tmp_path_factory.mktemp("resumed_in_s3")
    config = job_config(toy_files, root / "out", train={"epochs": MORE},
                        ray={"num_workers": 1, "max_failures": 0, "resume_from": str(two_workers.bundle_path.parent),
                             "storage_path": f"s3://{BUCKET}/ray", "storage_endpoint_url": s3_server})
    marker = root / "crashed.txt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAIL_ONCE_ENV, f"{MORE}:{marker}")
        with pytest.raises(RuntimeError, match="(?s)failed .*rerun the same job"):
            train_on_ray(config)
        assert marker.is_file() and f"epoch {MORE}" in marker.read_text()  # the hook raised; not again
        continued = train_on_ray(config)
    return config, continued


def test_resume_continues_the_epoch_count(resumed_in_s3, two_workers, s3_server, tmp_path):
    """The resumed run trained epochs 7 and 8 on 1 worker from the 2-worker run's last checkpoint: the first 6
    epochs of its history are that run's, the schedule and Adam's step count went on from there."""
    import pyarrow.fs
    import tensorflow as tf

    from imgcap.model.bundle import load_bundle
    from imgcap.train.state import CHECKPOINT_STATE

    previous = two_workers
    _, result = resumed_in_s3
    # where the run started, recorded by its checkpoints: the continuing rerun (and its bundle) still says so
    assert result.resumed_from.endswith(f"checkpoint_epoch_{EPOCHS:04d}") and result.continued_from
    assert load_bundle(result.bundle_path).provenance["resumed_from"] == result.resumed_from
    assert result.metrics["world_size"] == 1  # from 2 workers
    assert [h.epoch for h in result.history] == list(range(1, MORE + 1))
    assert [h.as_dict() for h in result.history[:EPOCHS]] == [h.as_dict() for h in previous.history]
    for k, h in enumerate(result.history):  # the learning-rate schedule went on through the resume and the rerun
        assert h.learning_rate == pytest.approx(LR * DECAY ** k, rel=1e-5)
    # Adam's step count went on too: read from the latest checkpoint, copied out of the bucket
    assert result.checkpoint.startswith(f"s3://{BUCKET}/")
    (tmp_path / "checkpoint").mkdir()
    pyarrow.fs.copy_files(result.checkpoint.removeprefix("s3://"), str(tmp_path / "checkpoint"),
                          source_filesystem=pyarrow.fs.S3FileSystem(endpoint_override=s3_server))
    key = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
    prefix = str(tmp_path / "checkpoint" / CHECKPOINT_STATE)
    assert int(tf.train.load_variable(prefix, key)) == MORE * result.metrics["steps"]
    assert min(h.dev_loss for h in result.history) <= min(h.dev_loss for h in previous.history) * 1.05


def test_config_errors_fail_before_any_worker_starts(ray_local, toy_files, tmp_path, monkeypatch):
    import ray.train.tensorflow

    from imgcap.train import ray_job

    def no_workers(*args, **kwargs):
        raise AssertionError("a Ray Train run was started")

    monkeypatch.setattr(ray.train.tensorflow, "TensorflowTrainer", no_workers)
    cpus = int(ray_local.cluster_resources()["CPU"])
    cases = [
        ({"data": {"features": str(tmp_path / "missing.npz")}}, "data.features: .*missing.npz does not exist"),
        ({"ray": {"num_workers": cpus + 1}, "train": {"batch_size": 8 * (cpus + 1)}},
         f"needs {cpus + 1} CPUs but the Ray cluster has {cpus}; set ray.num_workers <= {cpus}"),
        ({"ray": {"use_gpu": True, "num_workers": 1}}, "set ray.use_gpu = false"),
        ({"train": {"batch_size": 33}}, "must be divisible by ray.num_workers"),
        ({"ray": {"resume_from": str(tmp_path)}}, "no imgcap checkpoint"),
        ({"train": {"sampled_softmax": 500}}, r"train.sampled_softmax = 500 must be smaller than the vocabulary"),
        ({"data": {"dev_split": toy_files["train_split"], "train_split": str(tmp_path / "empty.txt")}},
         "train_split: .* does not exist"),
    ]
    for overrides, message in cases:
        with nothing_started_on(ray_local), pytest.raises(ConfigError, match=message):
            ray_job.train_on_ray(job_config(toy_files, tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_resume_checks_the_checkpoint_against_the_config(two_workers, toy_files, tmp_path, monkeypatch):
    import ray.train.tensorflow

    from imgcap.train.ray_job import train_on_ray

    monkeypatch.setattr(ray.train.tensorflow, "TensorflowTrainer", None)  # must not be reached
    previous = str(two_workers.bundle_path.parent)
    with pytest.raises(ConfigError, match="model.units is 32 but the checkpoint .* was trained with 64"):
        train_on_ray(job_config(toy_files, tmp_path / "out", model={"units": 32}, train={"epochs": EPOCHS + 1},
                                ray={"resume_from": previous}))
    with pytest.raises(ConfigError, match="train.weight_ema is 0.99 but the checkpoint .* was trained with 0.0"):
        train_on_ray(job_config(toy_files, tmp_path / "out", train={"epochs": EPOCHS + 1, "weight_ema": 0.99},
                                ray={"resume_from": previous}))
    with pytest.raises(ConfigError, match=rf"at xe epoch {EPOCHS} .* phase is done \(train.epochs = {EPOCHS}.*raise train.epochs"):
        train_on_ray(job_config(toy_files, tmp_path / "out", ray={"resume_from": previous}))


def test_train_job_reports_config_errors_with_status_2(ray_local, toy_files, tmp_path, capsys):
    from imgcap.cli import run_config_job
    from imgcap.config.training import TrainJobConfig
    from imgcap.train.ray_job import train_on_ray

    config = tmp_path / "train.toml"
    lines = [f'{k} = "{v}"' for k, v in toy_files.items()]
    config.write_text("\n".join(["[data]", *lines, "[ray]", "num_workers = 64"]) + "\n", encoding="utf-8")
    assert run_config_job(TrainJobConfig, train_on_ray, ["--config", str(config)]) == 2  # what jobs/train.py runs
    assert "set ray.num_workers <=" in capsys.readouterr().err
    assert run_config_job(TrainJobConfig, train_on_ray,
                          ["--config", str(config), "--set", "ray.max_failures=-1"]) == 2
    assert "ray.max_failures must be >= 0" in capsys.readouterr().err


# --- the attention decoder on 2 workers through both phases, self-critical training crashed mid-epoch and restored

SCST = {"enabled": True, "epochs": 2, "samples": 3, "batch_size": 60, "learning_rate": 1e-3, "patience": 0}
ATTENTION = {"architecture": "attention", "attention_dim": 16}


def no_trainer(*args, **kwargs):
    raise AssertionError("a Ray Train run was started")


@pytest.fixture(scope="module")
def scst_attention(ray_local, toy_files, tmp_path_factory):
    """The attention decoder over the toy vectors tiled into a thumbnail-shaped 16x16x3 grid (256 regions),
    2 workers: 1 cross-entropy epoch, then 2 self-critical ones; the last worker raises once in the middle of
    self-critical epoch 2, so the restarted worker group must restore a self-critical checkpoint."""
    from imgcap.train.ray_job import train_on_ray
    from imgcap.train.ray_worker import FAIL_ONCE_ENV

    root = tmp_path_factory.mktemp("scst_attention")
    with np.load(toy_files["features"]) as npz:
        np.savez(root / "grid.npz", ids=npz["ids"], features=np.tile(npz["features"], (1, 48)))
    files = {**toy_files, "features": str(root / "grid.npz"), "backbone": "thumbnail/none"}
    config = job_config(files, root / "out", model=ATTENTION, train={"epochs": 1}, scst=SCST)
    marker = root / "crashed.txt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAIL_ONCE_ENV, f"scst/2:{marker}")
        result = train_on_ray(config)
    return config, result, marker


def test_self_critical_training_resumes_from_its_checkpoint_with_two_workers(scst_attention):
    from imgcap.model.bundle import load_bundle

    _, result, marker = scst_attention
    assert marker.is_file() and "scst epoch 2" in marker.read_text()  # the hook did raise
    # The restarted group restored the checkpoint of self-critical epoch 1 (its optimizer, not a fresh one).
    assert result.metrics["started_at_phase"] == "scst" and result.metrics["started_at_epoch"] == 1
    assert result.metrics["world_size"] == 2
    assert [(h.phase, h.epoch) for h in result.history] == [("xe", 1), ("scst", 1), ("scst", 2)]
    scst = [h for h in result.history if h.phase == "scst"]
    assert all(h.train_reward > 0 for h in scst)
    assert all(h.steps == math.ceil(240 / SCST["batch_size"]) for h in scst)
    assert result.best_epoch == 1 + int(np.argmax([h.dev_cider for h in scst]))  # scst.select_by = "cider"
    run = Path(result.run_dir)
    assert (run / "checkpoint_scst_epoch_0002").is_dir() and result.checkpoint.endswith("checkpoint_scst_epoch_0002")
    bundle = load_bundle(result.bundle_path)
    assert bundle.provenance["phase"] == "scst" and bundle.provenance["phases"] == ["xe", "scst"]


def test_attention_trains_on_two_workers_and_a_rerun_finds_its_finished_run(scst_attention, monkeypatch):
    """The attention decoder through the same Ray Train job (the run of `scst_attention`): its bundle holds the
    attention model over 256 regions, restored from the checkpoints its workers wrote; the same job run again
    finds its finished run and writes the same bundle without training. (A rerun that trains on is the
    1-worker run's, `test_rerunning_a_job_continues_its_run`; a restarted worker group restoring this model's
    checkpoint mid-run is `test_self_critical_training_resumes_from_its_checkpoint_with_two_workers`.)"""
    import ray.train.tensorflow

    from imgcap.model.attention import AttentionCaptionModel
    from imgcap.model.bundle import load_bundle
    from imgcap.train.ray_job import train_on_ray

    config, first, _ = scst_attention
    assert first.continued_from is None and first.trained
    bundle = load_bundle(first.bundle_path)
    assert isinstance(bundle.model, AttentionCaptionModel) and bundle.model.regions == 256
    before = bundle.model.get_weights()

    monkeypatch.setattr(ray.train.tensorflow, "TensorflowTrainer", no_trainer)
    again = train_on_ray(config)
    assert not again.trained and again.run_dir == first.run_dir and again.checkpoint == first.checkpoint
    assert [h.as_dict() for h in again.history] == [h.as_dict() for h in first.history]
    after = load_bundle(again.bundle_path).model
    assert isinstance(after, AttentionCaptionModel) and after.regions == 256
    assert all(np.array_equal(a, b) for a, b in zip(after.get_weights(), before, strict=True))


# --- reruns: a stable run name, so the same job run again continues its Ray Train run (the `resumed_in_s3` job)


def test_rerunning_a_job_continues_its_run_in_the_bucket(resumed_in_s3, s3_server):
    import boto3
    import pyarrow.fs

    from imgcap.train.run_storage import default_run_name
    from imgcap.train.state import find_latest_checkpoint

    config, continued = resumed_in_s3
    name = default_run_name(config.output_dir)
    assert name.startswith("train-out-") and continued.run_dir == f"s3://{BUCKET}/ray/{name}"
    pages = boto3.client("s3", endpoint_url=s3_server).get_paginator("list_objects_v2")
    keys = {o["Key"] for page in pages.paginate(Bucket=BUCKET, Prefix="ray/") for o in page.get("Contents", [])}
    runs = {k.split("/")[1] for k in keys if k != "ray/"}  # ("ray/" itself: the storage path's directory marker)
    assert runs == {name}  # the crashed run's directory, continued: no second run
    assert continued.continued_from == f"{continued.run_dir}/checkpoint_epoch_{MORE - 1:04d}"
    assert continued.metrics["started_at_epoch"] == MORE - 1 and continued.trained
    assert continued.checkpoint == f"{continued.run_dir}/checkpoint_epoch_{MORE:04d}"
    for epoch in (EPOCHS + 1, MORE):  # the epochs this run trained, each checkpointed in the bucket
        assert {f"ray/{name}/checkpoint_epoch_{epoch:04d}/{f}" for f in ("state.index", "imgcap_checkpoint.json")} <= keys
    assert f"ray/{name}/checkpoint_manager_snapshot.json" in keys
    assert not any(".imgcap_probe" in k for k in keys)  # the storage probe was deleted
    output = Path(config.output_dir)
    assert not (output / "ray_results").exists() and (output / "bundle").is_dir()
    assert (output / "history.csv").read_text().count("\n") == MORE + 1
    s3 = pyarrow.fs.S3FileSystem(endpoint_override=s3_server)
    assert find_latest_checkpoint(f"{BUCKET}/ray", s3) == f"{BUCKET}/ray/{name}/checkpoint_epoch_{MORE:04d}"


def test_rerunning_a_finished_job_writes_the_outputs_without_training(resumed_in_s3, toy_files, monkeypatch):
    import dataclasses

    import ray.train.tensorflow

    from imgcap.model.bundle import load_bundle
    from imgcap.train.ray_job import train_on_ray

    config, continued = resumed_in_s3
    before = load_bundle(continued.bundle_path).model.get_weights()
    monkeypatch.setattr(ray.train.tensorflow, "TensorflowTrainer", no_trainer)
    again = train_on_ray(config)  # the finished run, read back from the bucket
    assert not again.trained and again.run_dir == continued.run_dir and again.checkpoint == continued.checkpoint
    assert [h.as_dict() for h in again.history] == [h.as_dict() for h in continued.history]
    assert again.best_epoch == continued.best_epoch and again.report.nltk_bleu == continued.report.nltk_bleu
    after = load_bundle(again.bundle_path).model.get_weights()
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(after, before))
    with pytest.raises(ConfigError, match=f"the checkpoint {continued.checkpoint} is at "
                                          rf"xe epoch {MORE} .* phase is done \(train.epochs = {MORE}"):  # ray.resume_from as a URI
        train_on_ray(job_config(toy_files, Path(config.output_dir).parent / "other", train={"epochs": MORE},
                                ray={"resume_from": continued.run_dir,
                                     "storage_endpoint_url": config.ray.storage_endpoint_url}))

    # More epochs: the same run trains on (Ray Train is started with the same run name and storage, as in the
    # rerun of `resumed_in_s3` that continued its crashed run).
    started = []

    class Started(Exception):
        pass

    def record(*args, run_config, **kwargs):
        started.append(run_config)
        raise Started

    monkeypatch.setattr(ray.train.tensorflow, "TensorflowTrainer", record)
    with pytest.raises(Started):
        train_on_ray(dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=MORE + 2)))
    assert started[0].name == Path(continued.run_dir).name and started[0].storage_path == f"{BUCKET}/ray"


def test_rerun_with_a_changed_config_is_refused(resumed_in_s3, monkeypatch):
    import dataclasses

    import ray.train.tensorflow

    from imgcap.train.ray_job import train_on_ray

    config, _ = resumed_in_s3
    monkeypatch.setattr(ray.train.tensorflow, "TensorflowTrainer", no_trainer)
    with pytest.raises(ConfigError, match=r"model.units is 32 but the existing run train-out-\w+ .* was trained "
                                          r"with 64; .* choose another output_dir or ray.run_name"):
        train_on_ray(dataclasses.replace(config, model=dataclasses.replace(config.model, units=32)))
    with pytest.raises(ConfigError, match=r"train.weight_ema is 0.9 but the existing run .* choose another output_dir"):
        train_on_ray(dataclasses.replace(config, train=dataclasses.replace(config.train, weight_ema=0.9)))


def test_unwritable_storage_path_fails_before_any_worker_starts(ray_local, s3_server, toy_files, tmp_path,
                                                               monkeypatch):
    import ray.train.tensorflow

    from imgcap.train.ray_job import train_on_ray

    monkeypatch.setattr(ray.train.tensorflow, "TensorflowTrainer", no_trainer)
    with nothing_started_on(ray_local), pytest.raises(
            ConfigError, match=r"ray.storage_path: cannot write the run train-out-\w+ to s3://no-such-bucket/runs: "
                               r".*(bucket|Bucket)"):
        train_on_ray(job_config(toy_files, tmp_path / "out", ray={"storage_path": "s3://no-such-bucket/runs",
                                                                  "storage_endpoint_url": s3_server}))
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    if not os.access(read_only, os.W_OK):  # (root may write anywhere)
        with pytest.raises(ConfigError, match="ray.storage_path: cannot write .* not a writable directory"):
            train_on_ray(job_config(toy_files, tmp_path / "out", ray={"storage_path": str(read_only / "runs")}))


SHARED = Path(__file__).resolve().parents[2] / "shared" / "flickr8k"


@pytest.mark.slow
def test_full_scale_ray_job_matches_single_process_dev_bleu(ray_local, tmp_path):
    """Must-show 2: configs/train_flickr8k.toml (6000 train / 1000 dev images, shared MobileNetV2 features)
    through the Ray Train job with 2 workers and through the single-process `train_captioner`: the dev BLEU-4
    of the saved bundles (the config's beam-3 decoding, NLTK corpus BLEU) agree within 0.01. ~20-30 min."""
    import dataclasses

    from imgcap.config.loader import load_config
    from imgcap.train.local import train_captioner
    from imgcap.train.ray_job import train_on_ray

    if not (SHARED / "features_mobilenet_v2.npz").is_file():
        pytest.skip(f"the shared Flickr8k features are not at {SHARED}")
    config = load_config(TrainJobConfig, Path(__file__).parents[1] / "configs" / "train_flickr8k.toml",
                         {"output_dir": str(tmp_path / "ray")})
    on_ray = train_on_ray(config)
    single = train_captioner(dataclasses.replace(config, output_dir=str(tmp_path / "single")), progress=False)
    figures = {
        "ray": {"bleu4": on_ray.report.nltk_bleu[3], "best_epoch": on_ray.best_epoch,
                "greedy_bleu4": [h.dev_bleu4 for h in on_ray.history]},
        "single": {"bleu4": single.report.nltk_bleu[3], "best_epoch": single.best_epoch,
                   "greedy_bleu4": [h.dev_bleu4 for h in single.history]},
    }
    print(json.dumps(figures, indent=2))
    assert abs(figures["ray"]["bleu4"] - figures["single"]["bleu4"]) <= 0.01, figures
