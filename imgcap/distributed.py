"""Data-parallel training of the caption decoder on Ray Train (jobs/train.py).

The same job runs as one process on a laptop and as N workers (CPU or GPU) on a cluster; only ``[ray]`` in the
config changes. Written for the Ray Train V2 API, the default in Ray 2.60 (``RAY_TRAIN_V2_ENABLED``):

- **Driver** (`train_on_ray`): validates everything before a worker starts (files, vocabulary and feature
  sizes, a resume checkpoint, workers vs the cluster's CPUs/GPUs, the batch split) and raises `ConfigError`
  with the key to change; then runs a ``TensorflowTrainer`` and, when it has finished, writes the model bundle
  from the best epoch's weights, ``history.csv`` and ``dev_report.json`` exactly as the single-process
  `imgcap.train.train_captioner` does.
- **Workers** (`train_loop_per_worker`): ``MultiWorkerMirroredStrategy`` (Ray sets ``TF_CONFIG``), the model and
  the `CaptionTrainer` built in its scope, and the epoch loop of `imgcap.train.run_epoch` (the one `fit` uses):
  a custom ``strategy.run`` step inside ``tf.function`` whose gradients are all-reduced. Keras 3 ``model.fit``
  fails under this strategy in Ray ("PerReplica ... to a Tensor"), which is why the loop is custom.

Data: every worker calls `prepare_training_data` itself with the driver's vocabulary (so all use identical ids)
and trains on its shard ``examples.shard(rank, world_size)`` (every world_size-th caption). This is used
instead of Ray Data ``get_dataset_shard`` because the training set is small (Flickr8k's features are 18 MB;
even COCO's fit in a worker's memory), the batches are length-bucketed per epoch by `iterate_batches`, and
every worker must take exactly the same number of steps per epoch or the all-reduce hangs: each worker runs
``num_batches = max over shards of ceil(shard size / per-worker batch)`` steps, cycling its shard if short.
Ray Data streaming would be the choice for a training set that does not fit in a worker's memory.

Batch and learning rate: ``train.batch_size`` is the *global* batch; each of N workers takes
``batch_size / N`` captions per step (``batch_size`` must be divisible by N). Each replica's loss is divided
by N before the gradients are summed, so a step is the gradient of the global-batch mean loss, the same as one
process with ``batch_size``: the learning rate needs no rescaling when N changes. To use N times the
hardware for N times the batch instead, raise ``train.batch_size`` and scale ``train.learning_rate`` yourself
(the linear-scaling rule), e.g. with ``--set``.

Dev evaluation (dev loss, greedy dev BLEU-4 when ``train.select_by = "bleu"``) runs on every worker on the
whole dev split: the weights are identical on all replicas, so every worker gets the same numbers and takes
the same early-stopping decision without another collective; all workers then call ``ray.train.report``
(rank 0 attaches the checkpoint).

Checkpoints (one per epoch, ``checkpoint_epoch_NNNN`` in the run directory): ``state.npz`` (model weights and
optimizer variables: step count and Adam moments), ``best_weights.npz`` (the weights of the best epoch so far,
so the bundle never depends on which checkpoints Ray kept), ``vocab.json`` and ``imgcap_checkpoint.json``
(epoch, history, best epoch and score, the job config, feature size). Ray keeps the
``ray.checkpoints_to_keep`` best by dev BLEU-4 (max) or dev loss (min), and always the latest.

Fault tolerance and resume:

- ``FailureConfig(max_failures=ray.max_failures)``: when a worker dies, Ray Train restarts the worker group and
  ``ray.train.get_checkpoint()`` hands the new workers the latest checkpoint; they continue with the next
  epoch (the interrupted epoch is redone from its start).
- ``ray.resume_from`` (a checkpoint, run or output directory): a new run starts from the latest checkpoint found
  there and continues the epoch count, the learning-rate schedule (``lr * lr_decay ** epoch``), the optimizer
  state, the history and the best epoch. Raise ``train.epochs`` to train a finished run further. (Ray Train
  V2 has no ``resume_from_checkpoint`` argument any more; the checkpoint path travels in the loop config.)
- A run name that already exists in ``ray.storage_path`` is refused unless ``ray.resume_from`` is set: Ray
  Train V2 would otherwise silently restore it.

Test hook: the environment variable ``IMGCAP_TEST_FAIL_ONCE="<epoch>:<marker file>"`` on the driver makes the
last worker raise once in the middle of that (1-based) epoch, creating the marker file first so that the
restarted run goes through. It exists for the fault-tolerance test and does nothing when unset.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgcap.config import ConfigError, TrainJobConfig, config_from_dict, config_to_dict
from imgcap.runtime import quiet_tensorflow
from imgcap.text import Vocabulary

log = logging.getLogger(__name__)

CHECKPOINT_META = "imgcap_checkpoint.json"
STATE_FILE = "state.npz"
BEST_WEIGHTS_FILE = "best_weights.npz"
VOCAB_FILE = "vocab.json"
FAIL_ONCE_ENV = "IMGCAP_TEST_FAIL_ONCE"


# --- checkpoints


def find_latest_checkpoint(path: str | Path) -> Path | None:
    """The imgcap checkpoint directory with the highest epoch at or below `path` (a checkpoint, a Ray run
    directory, a storage directory or a job's output directory), or None."""
    path = Path(path)
    if (path / CHECKPOINT_META).is_file():
        return path
    found = []
    for meta in path.rglob(CHECKPOINT_META):
        try:
            epoch = int(json.loads(meta.read_text(encoding="utf-8"))["epoch"])
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint being written or deleted
        if (meta.parent / STATE_FILE).is_file():
            found.append((epoch, meta.stat().st_mtime, meta.parent))
    return max(found)[2] if found else None


def read_checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / CHECKPOINT_META).read_text(encoding="utf-8"))


def _load_weights(path: Path) -> list[np.ndarray]:
    with np.load(path) as arrays:
        return [arrays[f"w_{k}"] for k in range(len(arrays.files))]


def _write_checkpoint(directory: Path, trainer: Any, vocab: Vocabulary, best_weights: list[np.ndarray],
                      meta: dict[str, Any]) -> None:
    trainer.save_state(directory / STATE_FILE)
    np.savez(directory / BEST_WEIGHTS_FILE, **{f"w_{k}": w for k, w in enumerate(best_weights)})
    vocab.save(directory / VOCAB_FILE)
    (directory / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")


# --- the worker loop


def _fail_once_hook(spec: str | None, epoch: int, rank: int, world_size: int):
    """The ``IMGCAP_TEST_FAIL_ONCE`` test hook for `epoch` (0-based), or None when it does not apply."""
    if not spec:
        return None
    fail_epoch, _, marker = spec.partition(":")
    if int(fail_epoch) != epoch + 1 or rank != world_size - 1 or not marker:
        return None

    def on_step(step: int, total: int) -> None:
        if step == total // 2 and not os.path.exists(marker):
            Path(marker).write_text(f"failed in epoch {epoch + 1} at step {step} of {total}\n", encoding="utf-8")
            raise RuntimeError(f"{FAIL_ONCE_ENV}: simulated crash of worker {rank} in epoch {epoch + 1}, "
                               f"step {step} of {total}")
    return on_step


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard, MultiWorkerMirroredStrategy, the shared epoch loop, per-epoch report."""
    quiet_tensorflow()
    import ray.train
    import tensorflow as tf

    from imgcap.dataset import prepare_training_data
    from imgcap.train import CaptionTrainer, EpochMetrics, build_model, run_epoch, selection_score

    tf.get_logger().setLevel(logging.WARNING)  # not one INFO line per collective op
    job = config_from_dict(TrainJobConfig, loop_config["job"])
    tf.config.threading.set_intra_op_parallelism_threads(job.ray.cpus_per_worker)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # TF_CONFIG set by Ray's TensorflowTrainer
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    vocab = Vocabulary.from_json(loop_config["vocab"])
    data = prepare_training_data(job.data, job.text, vocab)
    shard = data.train.shard(rank, world_size)
    batch_size = job.train.batch_size // world_size
    num_batches = max(math.ceil(len(data.train.shard(r, world_size)) / batch_size) for r in range(world_size))
    features = data.features.features
    dev_features = data.features.select(data.dev_ids).features
    dev_references = [data.dev_references[i] for i in data.dev_ids]
    num_images = len(np.unique(data.train.image_rows))

    with strategy.scope():
        model = build_model(job.model, vocab, data.features.dim, job.train.seed)
        trainer = CaptionTrainer(model, job.train, strategy)

    start_epoch, history, best_epoch, best_score = 0, [], 0, -math.inf
    best_weights = model.get_weights()
    restored = ray.train.get_checkpoint()  # set after a worker-group restart (or a restored run)

    def restore(directory: Path) -> None:
        nonlocal start_epoch, history, best_epoch, best_score, best_weights
        meta = read_checkpoint_meta(directory)
        trainer.load_state(directory / STATE_FILE)
        best_weights = _load_weights(directory / BEST_WEIGHTS_FILE)
        start_epoch, best_epoch = int(meta["epoch"]), int(meta["best_epoch"])
        best_score = float(meta["best_score"])
        history = [EpochMetrics(**h) for h in meta["history"]]
        log.info("worker %d: restored epoch %d from %s", rank, start_epoch, directory)

    if restored is not None:
        with restored.as_directory() as directory:
            restore(Path(directory))
    elif loop_config.get("resume_checkpoint"):
        restore(Path(loop_config["resume_checkpoint"]))
    restarts_from = start_epoch

    select_by, patience = job.train.select_by, job.train.patience
    for epoch in range(start_epoch, job.train.epochs):
        if patience and epoch - best_epoch >= patience:
            break  # restored from a checkpoint whose run had already stopped early
        rng = np.random.default_rng([job.train.seed, epoch, rank])
        metrics = run_epoch(trainer, vocab, shard, data.dev, features, dev_features, dev_references, epoch, rng,
                            num_images=num_images, num_captions=len(data.train), batch_size=batch_size,
                            num_batches=num_batches,
                            on_step=_fail_once_hook(loop_config.get("fail_once"), epoch, rank, world_size))
        history.append(metrics)
        score = selection_score(metrics, select_by)
        if score > best_score:
            best_score, best_epoch, best_weights = score, epoch + 1, trainer.evaluated_weights()
        stop = bool(patience) and epoch + 1 - best_epoch >= patience
        reported = {k: v for k, v in metrics.as_dict().items() if v is not None}
        reported.update(best_epoch=best_epoch, world_size=world_size, started_at_epoch=restarts_from,
                        steps=num_batches, early_stop=stop)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                meta = {"epoch": epoch + 1, "best_epoch": best_epoch, "best_score": best_score,
                        "history": [h.as_dict() for h in history], "job": loop_config["job"],
                        "feature_dim": data.features.dim, "vocab_size": len(vocab), "world_size": world_size,
                        "saved_at": time.time()}
                _write_checkpoint(Path(tmp), trainer, vocab, best_weights, meta)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(reported, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch_{epoch + 1:04d}")
        if stop:
            log.info("early stop: no better dev %s for %d epochs", select_by, patience)
            break


# --- the driver


@dataclass
class DistributedTrainResult:
    """What `train_on_ray` produced: the bundle, the per-epoch history, the dev evaluation and the Ray run."""

    bundle_dir: Path
    history: list  # list[EpochMetrics]
    best_epoch: int
    report: Any  # EvaluationReport
    run_dir: str  # Ray Train's run directory (checkpoints, metrics)
    checkpoint: str  # the latest checkpoint
    best_checkpoints: list[str]
    num_workers: int
    resumed_from: str | None = None
    metrics: dict[str, Any] | None = None  # the last metrics reported to Ray Train

    def format(self) -> str:
        lines = [f"bundle -> {self.bundle_dir}",
                 f"  Ray Train run: {self.run_dir} ({self.num_workers} worker(s))",
                 f"  latest checkpoint: {self.checkpoint}"]
        if self.resumed_from:
            lines.append(f"  resumed from: {self.resumed_from}")
        lines.append(f"  {len(self.history)} epoch(s), best epoch {self.best_epoch}")
        if self.history:
            best = next(h for h in self.history if h.epoch == self.best_epoch)
            bleu = "" if best.dev_bleu4 is None else f", greedy dev BLEU-4 {best.dev_bleu4:.4f}"
            mean_rate = np.mean([h.images_per_second for h in self.history])
            lines.append(f"  best epoch: dev loss {best.dev_loss:.4f}{bleu}; {mean_rate:.0f} images/s (mean)")
        return "\n".join(lines + ["  " + self.report.summary()])


def _is_local(path: str | None) -> bool:
    return bool(path) and "://" not in path


def _require_file(key: str, path: str | None) -> None:
    if _is_local(path) and not Path(path).exists():
        raise ConfigError(f"{key}: {path} does not exist; set {key} to an existing file")


def _check_cluster(config: TrainJobConfig) -> None:
    import ray

    ray_config = config.ray
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    needed = ray_config.num_workers * ray_config.cpus_per_worker
    if needed > cpus:
        most = int(cpus // ray_config.cpus_per_worker)
        raise ConfigError(f"ray.num_workers = {ray_config.num_workers} with ray.cpus_per_worker = "
                          f"{ray_config.cpus_per_worker} needs {needed} CPUs but the Ray cluster has {cpus:g}; "
                          f"set ray.num_workers <= {most} (or lower ray.cpus_per_worker, or add nodes)")
    if ray_config.use_gpu and gpus < ray_config.num_workers:
        raise ConfigError(f"ray.use_gpu = true needs one GPU per worker ({ray_config.num_workers}) but the Ray "
                          f"cluster has {gpus:g}; set ray.use_gpu = false or ray.num_workers <= {int(gpus)}")


def _check_resume(config: TrainJobConfig, checkpoint: Path) -> tuple[dict[str, Any], Vocabulary]:
    meta = read_checkpoint_meta(checkpoint)
    vocab = Vocabulary.load(checkpoint / VOCAB_FILE)
    saved = meta["job"]
    for table in ("model", "text"):
        ours = config_to_dict(getattr(config, table))
        for key, value in saved[table].items():
            if key != "glove_path" and ours.get(key) != value:
                raise ConfigError(f"{table}.{key} is {ours.get(key)!r} but the checkpoint {checkpoint} was trained "
                                  f"with {value!r}; set {table}.{key} = {value!r} to resume it, or drop ray.resume_from")
    if saved["train"].get("weight_ema", 0.0) != config.train.weight_ema:
        raise ConfigError(f"train.weight_ema is {config.train.weight_ema!r} but the checkpoint {checkpoint} was "
                          f"trained with {saved['train'].get('weight_ema', 0.0)!r} (its optimizer state holds the "
                          f"average or not); set it back to resume, or drop ray.resume_from")
    if meta["epoch"] >= config.train.epochs:
        raise ConfigError(f"the checkpoint {checkpoint} is at epoch {meta['epoch']} and train.epochs is "
                          f"{config.train.epochs}: nothing left to train; raise train.epochs to continue")
    return meta, vocab


def _run_directory(config: TrainJobConfig) -> tuple[str, str]:
    """(storage path, run name) of the job; refuses to reuse an existing run unless resuming."""
    storage = config.ray.storage_path or str(Path(config.output_dir).resolve() / "ray_results")
    name = config.ray.run_name or time.strftime("train-%Y%m%d-%H%M%S")
    run_dir = Path(storage) / name
    if _is_local(storage) and run_dir.exists() and any(run_dir.iterdir()) and not config.ray.resume_from:
        raise ConfigError(f"a Ray Train run {name!r} already exists in {storage}; set ray.resume_from = "
                          f"\"{run_dir}\" to continue it, or choose another ray.run_name")
    return storage, name


def validate_job(config: TrainJobConfig):
    """Every check that can fail before a worker starts; returns (training data, resume checkpoint or None).

    Raises `ConfigError` naming the key to change: missing files, an empty split, a resume checkpoint that
    does not fit the config (model/text settings, feature size, epochs), a GloVe file of the wrong dimension,
    a batch that does not split over the workers, more workers than the cluster's CPUs or GPUs.
    """
    from imgcap.dataset import prepare_training_data
    from imgcap.train import build_model, check_sampled_softmax

    for key, path in (("data.captions", config.data.captions), ("data.features", config.data.features),
                      ("data.train_split", config.data.train_split), ("data.dev_split", config.data.dev_split),
                      ("model.glove_path", config.model.glove_path)):
        _require_file(key, path)
    if config.train.batch_size % config.ray.num_workers:
        raise ConfigError(f"train.batch_size = {config.train.batch_size} (the global batch) must be divisible by "
                          f"ray.num_workers = {config.ray.num_workers}; change one of them")
    _check_cluster(config)

    resume, meta, vocab = None, None, None
    if config.ray.resume_from:
        if not Path(config.ray.resume_from).exists():
            raise ConfigError(f"ray.resume_from: {config.ray.resume_from} does not exist; point it at a checkpoint, "
                              f"run or output directory of an earlier run")
        resume = find_latest_checkpoint(config.ray.resume_from)
        if resume is None:
            raise ConfigError(f"ray.resume_from: no imgcap checkpoint ({CHECKPOINT_META}) under "
                              f"{config.ray.resume_from}; point it at a checkpoint, run or output directory")
        meta, vocab = _check_resume(config, resume)
    try:
        data = prepare_training_data(config.data, config.text, vocab)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data: {exc}") from None
    if meta is not None and meta["feature_dim"] != data.features.dim:
        raise ConfigError(f"data.features has {data.features.dim}-d features but the checkpoint {resume} was "
                          f"trained on {meta['feature_dim']}-d ones; use the features of the same backbone "
                          f"(data.features) or drop ray.resume_from")
    if len(data.train) < config.train.batch_size:
        raise ConfigError(f"train.batch_size = {config.train.batch_size} is larger than the {len(data.train)} "
                          f"training captions; lower train.batch_size")
    try:
        check_sampled_softmax(config.train, len(data.vocab))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        build_model(config.model, data.vocab, data.features.dim, config.train.seed)  # e.g. GloVe dimension
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from None
    return data, resume


def train_on_ray(config: TrainJobConfig) -> DistributedTrainResult:
    """The Ray Train job: validate, train on ``ray.num_workers`` workers, write the bundle and the reports.

    Writes into ``config.output_dir``: ``bundle/`` (best epoch; what `jobs/caption.py` loads),
    ``history.csv`` and ``dev_report.json``, like `imgcap.train.train_captioner`; Ray Train's run directory
    (checkpoints, per-report metrics) is under ``ray.storage_path`` (default ``<output_dir>/ray_results``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from imgcap.train import EpochMetrics, build_model, write_training_outputs

    if not ray.is_initialized():
        from imgcap.runtime import init_ray

        init_ray()
    storage, name = _run_directory(config)
    data, resume = validate_job(config)
    log.info("Ray Train: %d worker(s) x batch %d (global batch %d); vocabulary %d words; %d train / %d dev "
             "images; run %s in %s%s", config.ray.num_workers, config.train.batch_size // config.ray.num_workers,
             config.train.batch_size, len(data.vocab), len(data.train_ids), len(data.dev_ids), name, storage,
             f"; resuming {resume}" if resume else "")
    select_by = config.train.select_by
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"job": config_to_dict(config), "vocab": data.vocab.to_json(),
                           "resume_checkpoint": str(resume) if resume else None,
                           "fail_once": os.environ.get(FAIL_ONCE_ENV)},
        scaling_config=ScalingConfig(num_workers=config.ray.num_workers, use_gpu=config.ray.use_gpu,
                                     resources_per_worker={"CPU": config.ray.cpus_per_worker,
                                                           **({"GPU": 1} if config.ray.use_gpu else {})}),
        run_config=RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.ray.checkpoints_to_keep,
                checkpoint_score_attribute="dev_bleu4" if select_by == "bleu" else "dev_loss",
                checkpoint_score_order="max" if select_by == "bleu" else "min"),
            failure_config=FailureConfig(max_failures=config.ray.max_failures)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError and friends
        raise RuntimeError(f"the Ray Train run {name} failed (ray.max_failures = {config.ray.max_failures}): {exc}\n"
                           f"Its checkpoints are in {Path(storage) / name}; to continue from the latest, rerun "
                           f"with --set ray.resume_from='\"{Path(storage) / name}\"'") from exc
    if result.checkpoint is None:
        raise RuntimeError(f"the Ray Train run {name} finished without a checkpoint")

    with result.checkpoint.as_directory() as directory:
        meta = read_checkpoint_meta(directory)
        best_weights = _load_weights(Path(directory) / BEST_WEIGHTS_FILE)
    history = [EpochMetrics(**h) for h in meta["history"]]
    model = build_model(config.model, data.vocab, data.features.dim, config.train.seed)
    model.set_weights(best_weights)
    provenance = {"train_job": config_to_dict(config), "best_epoch": meta["best_epoch"],
                  "history": meta["history"], "ray_run": result.path, "resumed_from": str(resume) if resume else None}
    bundle_dir, report = write_training_outputs(config, model, data, history, provenance)
    best = [c.path for c, _ in (result.best_checkpoints or [])]
    return DistributedTrainResult(bundle_dir, history, int(meta["best_epoch"]), report, result.path,
                                  result.checkpoint.path, best, config.ray.num_workers,
                                  str(resume) if resume else None, dict(result.metrics or {}))
