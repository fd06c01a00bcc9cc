"""Data-parallel training of the caption decoder on Ray Train (jobs/train.py).

The same job runs as one process on a laptop and as N workers (CPU or GPU) on a cluster; only ``[ray]`` in the
config changes. Written for the Ray Train V2 API, the default in Ray 2.60 (``RAY_TRAIN_V2_ENABLED``):

- **Driver** (`train_on_ray`): validates everything before a worker starts (files, vocabulary and feature
  sizes, the storage, an existing run or a resume checkpoint, workers vs the cluster's CPUs/GPUs, the batch
  split) and raises `ConfigError` with the key to change (an autoscaling cluster is waited for, see below);
  then runs a ``TensorflowTrainer`` and, when it has finished, writes the model bundle
  from the best epoch's weights, ``history.csv`` and ``dev_report.json`` exactly as the single-process
  `imgcap.train.train_captioner` does.
- **Workers** (`train_loop_per_worker`): ``MultiWorkerMirroredStrategy`` (Ray sets ``TF_CONFIG``), the model and
  the `CaptionTrainer` built in its scope, and the phase loop of `imgcap.train.train_phase` (the one `fit` uses):
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

Self-critical training (``[scst]``, `imgcap.scst`) is the second phase of the same loop: each worker samples
and rewards the captions of its shard of the training images (every world_size-th image), the advantages
weight the same all-reduced step, and the run's checkpoints carry the phase, so a restarted worker group
resumes self-critical training where it stopped (with its optimizer), and a rerun with ``scst.enabled``
switched on continues a finished cross-entropy run into the self-critical phase.

Dev evaluation (dev loss, greedy dev BLEU-4 and CIDEr-D) runs on every worker on the
whole dev split: the weights are identical on all replicas, so every worker gets the same numbers and takes
the same early-stopping decision without another collective; all workers then call ``ray.train.report``
(rank 0 attaches the checkpoint).

Checkpoints (one per epoch, ``checkpoint_epoch_NNNN`` / ``checkpoint_scst_epoch_NNNN`` in the run directory):
``state.index`` + ``state.data-*``, a ``tf.train.Checkpoint`` of the model, the optimizer (step count, Adam moments,
weight average) and the weights of the phase's best epoch so far (so the bundle never depends on which
checkpoints Ray kept); ``vocab.json``; ``imgcap_checkpoint.json`` (the `imgcap.training_state.TrainingState`:
phase, epoch, history, best epoch and score; the job config, feature size). Every worker writes it
(TensorFlow's rule under MultiWorkerMirroredStrategy); rank 0's is reported. Ray keeps the
``ray.checkpoints_to_keep`` best by the last phase's ``select_by`` score (dev BLEU-4 or CIDEr-D max, dev loss
min), and always the latest.

Fault tolerance, reruns and resume:

- ``FailureConfig(max_failures=ray.max_failures)``: when a worker dies, Ray Train restarts the worker group and
  ``ray.train.get_checkpoint()`` hands the new workers the latest checkpoint; they continue with the next
  epoch (the interrupted epoch is redone from its start).
- **A rerun of the same job continues its run.** The default run name is stable, derived from the output:
  ``train-<output_dir name>-<8 hex of a hash of the resolved output_dir>`` (`default_run_name`). Ray Train V2
  restores a run with the same name and storage path: its controller's ``CheckpointManager`` loads
  ``checkpoint_manager_snapshot.json`` from the run directory (``_maybe_load_state_from_storage`` in
  ``ray/train/v2/_internal/execution/checkpoint/checkpoint_manager.py``) and hands its latest checkpoint to
  the workers through ``ray.train.get_checkpoint()``; there is no flag and no refusal. So a job killed with
  its cluster, or failed after ``ray.max_failures`` restarts, is continued by running it again. Before any
  worker starts, the driver reads that snapshot itself and checks the run's latest checkpoint against the
  config (model and text settings, ``train.weight_ema``, feature size): a changed config fails with the key
  and "choose another output_dir or ray.run_name" instead of restoring weights that do not fit. The
  snapshot records the Ray version, and Ray Train refuses a snapshot of another version
  (``CheckpointManager._load_state``): that is reported the same way, before any worker starts. A run that
  is already finished (``train.epochs`` reached, or stopped early by ``train.patience``) is not started
  again: the bundle and reports are written from its latest checkpoint (``ray.train.Result.from_path``,
  ``ray/train/v2/api/result.py``); raise ``train.epochs`` and the rerun trains on.
- ``ray.resume_from`` (a checkpoint, run or output directory, or URI) starts a *new* run from the latest
  checkpoint found there and continues the epoch count, the learning-rate schedule (``lr * lr_decay **
  epoch``), the optimizer state, the history and the best epoch; it needs ``train.epochs`` above the
  checkpoint's epoch. (Ray Train V2 has no ``resume_from_checkpoint`` argument any more; the checkpoint
  location travels in the loop config.) Once the new run exists, a rerun continues the run itself and
  ``ray.resume_from`` is ignored.

Storage: ``ray.storage_path`` is a local directory (default ``<output_dir>/ray_results``; on a multi-node
cluster a shared one) or any pyarrow filesystem URI (``s3://bucket/prefix``, ``gs://...``), resolved as every
imgcap output is (`imgcap.sources.filesystem_for`). ``ray.storage_endpoint_url`` names an S3-compatible
endpoint (MinIO, Ceph, moto), as does ``AWS_ENDPOINT_URL``. The driver resolves the filesystem once, checks that the run
directory is reachable and writable (a probe object written and deleted; for a local path nothing is created
before the config is known to be valid), reads existing runs and checkpoints through it, and hands it to
Ray Train as ``RunConfig(storage_filesystem=...)`` with the prefix-stripped path (what V2's
``StorageContext`` expects, ``ray/train/v2/_internal/execution/storage.py``). Workers and the Ray Train
controller get the filesystem pickled; credentials come from their own environment (AWS_* variables,
instance role).

Autoscaling clusters: the driver compares the workers' CPUs/GPUs with ``ray.cluster_resources()``. When they
are short and the cluster cannot grow (a local ``ray.init()``, a fixed cluster) it refuses at once. When an
autoscaler can still add nodes (`imgcap.runtime.cluster_can_grow`) it logs what is missing and waits, at most
``ray.resource_timeout_s`` (0: refuse at once), by placing a placement group of the workers' bundles -- the
same shape Ray Train asks for, and the demand the autoscaler scales up for -- and removes it when it is
ready; on timeout a `ConfigError` names the keys. How "can grow" is told in Ray 2.60:

- the cluster config the autoscaler publishes in the GCS (``ray._private.state.state.get_cluster_config()``;
  node groups with min/max counts, ``ray/_private/state.py``). Ray Train V2 itself uses it
  (``WorkerGroup._check_cluster_resources_and_raise_if_insufficient``) and so does Ray Data
  (``ray/data/_internal/cluster_autoscaler/util.py``: ``is_autoscaling_enabled``); when it is there the
  fully scaled-up maximum is checked too. The open-source autoscalers of Ray 2.60 do not publish it (the GCS
  client has ``report_cluster_config``, but nothing in the Ray 2.60 wheel calls it), so:
- the autoscaler's own status, what ``ray status`` shows: for autoscaler v2
  (``ray.autoscaler.v2.utils.is_autoscaler_v2``) ``ray.autoscaler.v2.sdk.get_cluster_status``, for v1 the
  JSON the monitor writes under ``__autoscaling_status`` in the GCS KV. Every Ray head runs that monitor; on
  a cluster without an autoscaling config (``ray.init()``, ``ray start`` by hand) it runs a read-only node
  provider whose node types are named ``node_<node id>`` (``format_readonly_node_type``,
  ``ray/autoscaler/_private/monitor.py`` ``BASE_READONLY_CONFIG``). Node types with other names, or pending
  launches, mean a real node provider (cluster launcher, KubeRay) that can add nodes.

Ray Train V2's own scheduling does not fail before the autoscaler delivers (so the wait above only bounds
it): the worker group waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) for its placement group, then
raises ``WorkerGroupStartupTimeoutError`` (``ray/train/v2/_internal/execution/worker_group/worker_group.py``),
which the default failure policy retries as a controller failure (``RETRYABLE_CONTROLLER_ERRORS`` in
``.../failure_handling/default.py``), without limit by default (``FailureConfig.controller_failure_limit =
-1``, set explicitly here) and without using up ``ray.max_failures``. Its only up-front check is against the
GCS cluster config's maximum, which the driver checks first. The same holds for a worker-group restart after
a node was lost: Ray Train waits for the autoscaler to replace it.

Test hook: the environment variable ``IMGCAP_TEST_FAIL_ONCE="<epoch>:<marker file>"`` on the driver makes the
last worker raise once in the middle of that (1-based) epoch, creating the marker file first so that the
restarted run goes through. It exists for the fault-tolerance test and does nothing when unset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from imgcap.config import ConfigError, TrainJobConfig, config_from_dict, config_to_dict
from imgcap.runtime import cluster_can_grow, import_tensorflow
from imgcap.sources import S3Options, filesystem_for
from imgcap.text import Vocabulary
from imgcap.training_state import (CHECKPOINT_META, VOCAB_FILE, Phase, TrainingState, best_of, describe_best,
                                   find_latest_checkpoint, read_checkpoint_meta, read_text, training_phases)

log = logging.getLogger(__name__)

FAIL_ONCE_ENV = "IMGCAP_TEST_FAIL_ONCE"
# Ray Train V2's record of a run's checkpoints in the run directory (CHECKPOINT_MANAGER_SNAPSHOT_FILENAME in
# ray/train/v2/_internal/constants.py); a run directory with it is restored by a run of the same name.
RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


# --- storage: local paths and pyarrow filesystem URIs


def _is_local(path: str | None) -> bool:
    return bool(path) and "://" not in path


def _resolve_filesystem(location: str, endpoint_url: str | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) of a local path or a URI; `endpoint_url`: an S3-compatible store."""
    return filesystem_for(location.split("?", 1)[0], S3Options(endpoint_url=endpoint_url))


def _exists(filesystem: Any, path: str, kind: str = "any") -> bool:
    import pyarrow.fs as pafs

    found = filesystem.get_file_info(path).type
    if kind == "file":
        return found == pafs.FileType.File
    if kind == "dir":
        return found == pafs.FileType.Directory
    return found != pafs.FileType.NotFound


@dataclass(frozen=True)
class RunLocation:
    """Where the job's Ray Train run lives: its storage (a pyarrow filesystem and a path on it) and name."""

    filesystem: Any  # pyarrow.fs.FileSystem
    storage_path: str  # on `filesystem`: a local absolute path, or a URI without its scheme (bucket/prefix)
    name: str
    storage_uri: str  # as configured: a local path or a URI (for messages)

    @property
    def local(self) -> bool:
        return _is_local(self.storage_uri)

    @property
    def path(self) -> str:
        """The run directory on `filesystem`."""
        return f"{self.storage_path}/{self.name}"

    @property
    def uri(self) -> str:
        """The run directory as the user would write it."""
        return self.display(self.path)

    def display(self, fs_path: str) -> str:
        """A path on `filesystem` as a local path or a URI (``s3://bucket/...``)."""
        if self.local:
            return fs_path
        return f"{self.storage_uri.partition('://')[0]}://{fs_path}"


def default_run_name(output_dir: str) -> str:
    """The stable run name of a job: ``train-<output_dir name>-<8 hex of a hash of the resolved output_dir>``;
    the same job run again gets the same name and so continues its run."""
    target = Path(output_dir).resolve().as_posix() if _is_local(output_dir) else output_dir.rstrip("/")
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", PurePosixPath(target.partition("://")[2] or target).name) or "output"
    return f"train-{base}-{hashlib.sha256(target.encode('utf-8')).hexdigest()[:8]}"


def _run_location(config: TrainJobConfig) -> RunLocation:
    """The job's storage and run name (``ray.storage_path``, ``ray.run_name``); a URI that pyarrow cannot
    resolve is a `ConfigError` naming ``ray.storage_path``."""
    storage = config.ray.storage_path or str(Path(config.output_dir).resolve() / "ray_results")
    name = config.ray.run_name or default_run_name(config.output_dir)
    try:
        filesystem, path = _resolve_filesystem(storage, config.ray.storage_endpoint_url)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for unknown schemes and unreachable stores
        raise ConfigError(f"ray.storage_path: cannot open {storage}: {exc}; set ray.storage_path to a local "
                          f"directory or a URI that pyarrow.fs.FileSystem.from_uri accepts (s3://bucket/prefix; "
                          f"ray.storage_endpoint_url for an S3-compatible store)") from None
    return RunLocation(filesystem, path, name, storage)


def _check_storage(run: RunLocation) -> None:
    """The run directory must be reachable and writable before any worker starts (Ray Train would only fail
    in its controller). A URI: the run directory is created and a probe object written, read back and
    deleted. A local path: nothing is created yet (the config may still be invalid); the storage directory,
    or the nearest directory above it that exists, must be writable."""
    probe = f"{run.path}/.imgcap_probe_{uuid.uuid4().hex}"
    try:
        if run.local:
            existing = Path(run.storage_path)
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
                raise OSError(f"{existing} is not a writable directory")
        else:
            run.filesystem.create_dir(run.path, recursive=True)
            with run.filesystem.open_output_stream(probe) as f:
                f.write(b"imgcap storage probe\n")
            if not _exists(run.filesystem, probe, "file"):
                raise OSError(f"the probe object {run.display(probe)} was written but cannot be found")
            run.filesystem.delete_file(probe)
    except Exception as exc:
        raise ConfigError(f"ray.storage_path: cannot write the run {run.name} to {run.storage_uri}: {exc}; set "
                          f"ray.storage_path to a reachable, writable directory or URI (an existing bucket; "
                          f"ray.storage_endpoint_url for an S3-compatible store)") from None


# --- the worker loop


def _fail_once_hook(spec: str | None, phase: str, epoch: int, rank: int, world_size: int):
    """The ``IMGCAP_TEST_FAIL_ONCE`` test hook for `epoch` (0-based) of `phase`, or None when it does not apply."""
    if not spec:
        return None
    fail_epoch, _, marker = spec.partition(":")
    fail_phase, _, fail_epoch = fail_epoch.rpartition("/")
    if (fail_phase or "xe") != phase or int(fail_epoch) != epoch + 1 or rank != world_size - 1 or not marker:
        return None

    def on_step(step: int, total: int) -> None:
        if step == total // 2 and not os.path.exists(marker):
            Path(marker).write_text(f"failed in {phase} epoch {epoch + 1} at step {step} of {total}\n",
                                    encoding="utf-8")
            raise RuntimeError(f"{FAIL_ONCE_ENV}: simulated crash of worker {rank} in {phase} epoch {epoch + 1}, "
                               f"step {step} of {total}")
    return on_step


def _checkpoint_dir_name(phase: str, epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}" if phase == "xe" else f"checkpoint_{phase}_epoch_{epoch:04d}"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard, MultiWorkerMirroredStrategy, the shared phase loop, per-epoch report."""
    tf = import_tensorflow()  # before the imports below bring it in: no CPU banners
    import ray.train

    from imgcap.dataset import prepare_training_data
    from imgcap.train import (CaptionTrainer, dev_evaluator, initial_model, phase_batches, phase_sizes,
                              start_model, train_phase, write_checkpoint)

    tf.get_logger().setLevel(logging.WARNING)  # not one INFO line per collective op
    job = config_from_dict(TrainJobConfig, loop_config["job"])
    tf.config.threading.set_intra_op_parallelism_threads(job.ray.cpus_per_worker)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # TF_CONFIG set by Ray's TensorflowTrainer
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    vocab = Vocabulary.from_json(loop_config["vocab"])
    data = prepare_training_data(job.data, job.text, vocab)
    phases = training_phases(job)

    # After a worker-group restart, or in a rerun of an existing run, Ray hands over the run's latest
    # checkpoint; ray.resume_from starts a new run from another run's checkpoint; else the run starts afresh
    # (from scst.init_from when it is set).
    source = ray.train.get_checkpoint()
    if source is None and loop_config.get("resume_checkpoint"):
        source = ray.train.Checkpoint(loop_config["resume_checkpoint"], filesystem=loop_config.get("resume_filesystem"))
    with strategy.scope():
        model = start_model(job, data, None if source is not None else initial_model(job))

    def phase_trainer(phase: Phase) -> Any:
        with strategy.scope():
            return CaptionTrainer(model, phase.config, strategy, phase.dropout)

    if source is not None:
        with source.as_directory() as directory:  # a local checkpoint as it is; one in a bucket downloaded
            state = TrainingState.from_meta(read_checkpoint_meta(directory))
            phase = next(p for p in phases if p.name == state.phase)
            trainer = phase_trainer(phase)
            trainer.restore(directory)
        log.info("worker %d: restored %s epoch %d from %s", rank, state.phase, state.epoch, source.path)
    else:
        state = TrainingState(phases[0].name)
        trainer = phase_trainer(phases[0])
    started_at = (state.phase, state.epoch)
    evaluator = dev_evaluator(job, data, model)
    remaining = phases[[p.name for p in phases].index(state.phase):]
    for k, phase in enumerate(remaining):
        if k:  # the next phase starts from the best weights of the last
            trainer.restore_best()
            state.begin(phase.name)
            trainer = phase_trainer(phase)
        images, captions = phase_sizes(phase, job, data)
        batches = phase_batches(phase, job, data, model, rank=rank, world_size=world_size)
        epochs = train_phase(trainer, evaluator, state, batches, num_images=images, num_captions=captions,
                             on_step=lambda epoch: _fail_once_hook(loop_config.get("fail_once"), phase.name, epoch,
                                                                   rank, world_size))
        for metrics in epochs:
            reported = {k: v for k, v in metrics.as_dict().items() if v is not None}
            reported.update(best_epoch=state.best_epoch, world_size=world_size, started_at_phase=started_at[0],
                            started_at_epoch=started_at[1], early_stop=state.stops_early(phase.config))
            meta = {"job": loop_config["job"], "feature_dim": data.features.dim, "vocab_size": len(vocab),
                    "world_size": world_size, "saved_at": time.time()}
            with tempfile.TemporaryDirectory() as tmp:
                # Every worker writes the checkpoint (TensorFlow's rule for MultiWorkerMirroredStrategy: saving
                # may read variables across workers); only the chief's goes to Ray Train.
                write_checkpoint(Path(tmp), trainer, state, vocab, meta)
                checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
                ray.train.report(reported, checkpoint=checkpoint,
                                 checkpoint_dir_name=_checkpoint_dir_name(phase.name, metrics.epoch))


# --- the driver


@dataclass
class DistributedTrainResult:
    """What `train_on_ray` produced: the bundle, the per-epoch history, the dev evaluation and the Ray run."""

    bundle_dir: Path
    history: list  # list[EpochMetrics]
    best_epoch: int
    report: Any  # EvaluationReport
    run_dir: str  # Ray Train's run directory (checkpoints, metrics): a local path or a URI
    checkpoint: str  # the latest checkpoint
    best_checkpoints: list[str]
    num_workers: int
    resumed_from: str | None = None  # ray.resume_from: the checkpoint this new run started from
    metrics: dict[str, Any] | None = None  # the last metrics reported to Ray Train
    continued_from: str | None = None  # a rerun: the checkpoint of the existing run it continued from
    trained: bool = True  # False: the run had already finished; the bundle was written from its result

    def format(self) -> str:
        lines = [f"bundle -> {self.bundle_dir}",
                 f"  Ray Train run: {self.run_dir} ({self.num_workers} worker(s))",
                 f"  latest checkpoint: {self.checkpoint}"]
        if self.resumed_from:
            lines.append(f"  resumed from: {self.resumed_from}")
        if not self.trained:
            lines.append("  the run had already finished: nothing trained, outputs written from its latest checkpoint")
        elif self.continued_from:
            lines.append(f"  continued the existing run from: {self.continued_from}")
        lines.append(f"  {len(self.history)} epoch(s)")
        best = best_of(self.history, self.best_epoch)
        if best is not None:
            mean_rate = np.mean([h.images_per_second for h in self.history if h.phase == best.phase])
            lines.append(f"  {describe_best(best)}; {mean_rate:.0f} images/s (mean)")
        return "\n".join(lines + ["  " + self.report.summary()])


def _require_file(key: str, path: str | None) -> None:
    if _is_local(path) and not Path(path).exists():
        raise ConfigError(f"{key}: {path} does not exist; set {key} to an existing file")


# --- the cluster: enough CPUs/GPUs now, or an autoscaler to deliver them


def _worker_bundle(config: TrainJobConfig) -> dict[str, float]:
    return {"CPU": config.ray.cpus_per_worker, **({"GPU": 1} if config.ray.use_gpu else {})}


def _cluster_shortfall(config: TrainJobConfig, resources: dict[str, float]) -> str | None:
    """What the workers need that `resources` (CPU/GPU totals) lack, as a `ConfigError` message, or None."""
    ray_config = config.ray
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    needed = ray_config.num_workers * ray_config.cpus_per_worker
    if needed > cpus:
        most = int(cpus // ray_config.cpus_per_worker)
        return (f"ray.num_workers = {ray_config.num_workers} with ray.cpus_per_worker = "
                f"{ray_config.cpus_per_worker} needs {needed} CPUs but the Ray cluster has {cpus:g}; "
                f"set ray.num_workers <= {most} (or lower ray.cpus_per_worker, or add nodes)")
    if ray_config.use_gpu and gpus < ray_config.num_workers:
        return (f"ray.use_gpu = true needs one GPU per worker ({ray_config.num_workers}) but the Ray "
                f"cluster has {gpus:g}; set ray.use_gpu = false or ray.num_workers <= {int(gpus)}")
    return None


def _max_cluster_resources() -> dict[str, float] | None:
    """The fully scaled-up cluster's resources from the GCS cluster config, or None (not published)."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:
        return None


def _check_cluster(config: TrainJobConfig, wait: bool = True) -> None:
    """Enough CPUs/GPUs for ``ray.num_workers`` workers, or an autoscaler to add them.

    A fixed cluster that lacks them is refused at once. On a cluster that can grow (`imgcap.runtime.cluster_can_grow`) a
    warning says what is missing and, with `wait`, this waits up to ``ray.resource_timeout_s`` for the
    autoscaler (0: refuse at once); `validate_job` first calls it with ``wait=False`` (refuse a fixed cluster
    before reading the data) and waits last, once everything else is known to be valid.
    """
    import ray

    missing = _cluster_shortfall(config, ray.cluster_resources())
    if missing is None:
        return
    timeout = config.ray.resource_timeout_s
    if not timeout or not cluster_can_grow():
        raise ConfigError(missing)
    most = _max_cluster_resources()
    if most:
        beyond = _cluster_shortfall(config, most)
        if beyond is not None:
            at_most = "even fully scaled up (the autoscaler's cluster config) the Ray cluster has at most"
            raise ConfigError(beyond.replace("the Ray cluster has", at_most))
    if wait:
        _wait_for_cluster(config, missing)


def _wait_for_cluster(config: TrainJobConfig, missing: str) -> None:
    """Wait up to ``ray.resource_timeout_s`` until the workers' bundles can be placed.

    A placement group of the same bundles Ray Train will ask for is the demand the autoscaler scales up for
    (``ray.autoscaler.sdk.request_resources`` would replace every other job's request on the cluster); it is
    removed as soon as it is ready (or at the timeout), and Ray Train then places its own.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    timeout = config.ray.resource_timeout_s
    log.warning("%s -- an autoscaler can add nodes, so Ray Train will wait for the autoscaler: waiting up to "
                "%g s (ray.resource_timeout_s) for %d worker(s) of %s", missing, timeout, config.ray.num_workers,
                _worker_bundle(config))
    started = time.monotonic()
    group = placement_group([_worker_bundle(config)] * config.ray.num_workers, strategy="PACK",
                            name=f"imgcap-wait-{uuid.uuid4().hex[:8]}")
    try:
        while (left := timeout - (time.monotonic() - started)) > 0:
            if group.wait(math.ceil(min(left, 60.0))):  # whole seconds: the core worker truncates a float
                log.info("the Ray cluster has the workers' resources after %.0f s: %s",
                         time.monotonic() - started, ray.cluster_resources())
                return
            log.info("still waiting for the autoscaler (%.0f of %g s): the cluster has %s",
                     time.monotonic() - started, timeout, ray.cluster_resources())
    finally:
        remove_placement_group(group)
    now = _cluster_shortfall(config, ray.cluster_resources()) or missing
    raise ConfigError(f"waited {timeout:g} s (ray.resource_timeout_s) for the autoscaler, in vain: {now}; or raise "
                      f"ray.resource_timeout_s if the cluster is still scaling up")


# --- an existing run, a resume checkpoint


def _check_resume(config: TrainJobConfig, checkpoint: str | Path, filesystem: Any = None, *,
                  label: str | None = None, fix: str = "or drop ray.resume_from") -> tuple[dict[str, Any], Vocabulary]:
    """The checkpoint's meta and vocabulary, if its model, text settings and weight averaging fit `config`;
    else a `ConfigError` naming the key (`label` describes the checkpoint, `fix` ends the message)."""
    meta = read_checkpoint_meta(checkpoint, filesystem)
    if filesystem is None:
        vocab = Vocabulary.load(Path(checkpoint) / VOCAB_FILE)
    else:
        vocab = Vocabulary.from_json(read_text(filesystem, f"{checkpoint}/{VOCAB_FILE}"))
    label = label or f"the checkpoint {checkpoint}"
    saved = meta["job"]
    for table in ("model", "text"):
        ours = config_to_dict(getattr(config, table))
        for key, value in saved[table].items():
            if key != "glove_path" and ours.get(key) != value:
                raise ConfigError(f"{table}.{key} is {ours.get(key)!r} but {label} was trained with {value!r}; "
                                  f"set {table}.{key} = {value!r} to continue it, {fix}")
    phase = meta["phase"]
    phases = {p.name: p for p in training_phases(config)}
    if phase not in phases:
        wanted = ("scst.enabled = true (and no scst.init_from)" if phase == "scst"
                  else "no scst.init_from (it skips the cross-entropy phase)")
        raise ConfigError(f"{label} is in the {phase} phase, which this config does not train; set {wanted} to "
                          f"continue it, {fix}")
    table = "train" if phase == "xe" else "scst"
    saved_ema = saved.get(table, {}).get("weight_ema", 0.0)
    if saved_ema != phases[phase].config.weight_ema:
        raise ConfigError(f"{table}.weight_ema is {phases[phase].config.weight_ema!r} but {label} was trained with "
                          f"{saved_ema!r} (its optimizer state holds the average or not); set it back to continue "
                          f"it, {fix}")
    return meta, vocab


@dataclass
class ExistingRun:
    """A run of this job's name already in storage: Ray Train V2 will restore it (see the module docstring)."""

    checkpoint: str  # its latest checkpoint, on the run's filesystem
    meta: dict[str, Any]
    vocab: Vocabulary
    finished: bool = False  # nothing left to train (`_run_is_finished`): no worker is started


def _existing_run(config: TrainJobConfig, run: RunLocation) -> ExistingRun | None:
    """The run Ray Train V2 will restore (its snapshot's latest checkpoint), checked against `config`."""
    import ray

    fix = (f"or choose another output_dir or ray.run_name to start a new run (ray.resume_from = \"{run.uri}\" "
           f"starts one from this run's latest checkpoint)")
    snapshot_path = f"{run.path}/{RUN_SNAPSHOT}"
    if not _exists(run.filesystem, snapshot_path, "file"):
        if _exists(run.filesystem, run.path, "dir") and find_latest_checkpoint(run.path, run.filesystem):
            log.warning("the run directory %s holds checkpoints but no Ray Train snapshot (%s): Ray Train starts "
                        "the run from scratch there", run.uri, RUN_SNAPSHOT)
        return None
    try:
        snapshot = json.loads(read_text(run.filesystem, snapshot_path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the Ray Train run {run.name} in {run.storage_uri} cannot be continued: its {RUN_SNAPSHOT} "
                          f"is unreadable ({exc}); {fix.removeprefix('or ')}") from None
    if snapshot.get("ray_version") != ray.__version__:
        raise ConfigError(f"the Ray Train run {run.name} in {run.storage_uri} was written by Ray "
                          f"{snapshot.get('ray_version')} and Ray Train {ray.__version__} cannot restore it; "
                          f"{fix.removeprefix('or ')}")
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if not latest:
        return None  # no checkpoint yet: Ray Train starts the run over
    checkpoint = f"{run.path}/{latest}"
    if not _exists(run.filesystem, f"{checkpoint}/{CHECKPOINT_META}", "file"):
        raise ConfigError(f"the Ray Train run {run.name} in {run.storage_uri} lists its latest checkpoint {latest} "
                          f"but it is not there; {fix.removeprefix('or ')}")
    meta, vocab = _check_resume(config, checkpoint, run.filesystem,
                                label=f"the existing run {run.name} in {run.storage_uri} (rerunning a job "
                                      f"continues its run; checkpoint {run.display(checkpoint)})", fix=fix)
    return ExistingRun(checkpoint, meta, vocab)


def _run_is_finished(meta: dict[str, Any], config: TrainJobConfig) -> bool:
    """Whether the worker loop would train no epoch from this checkpoint: its last phase has its epochs, or
    stopped early (``patience`` epochs without a better dev score)."""
    return TrainingState.from_meta(meta).finished(training_phases(config))


@dataclass
class JobPlan:
    """What `validate_job` found: the data, where the run goes and where it starts from."""

    data: Any  # TrainingData
    run: RunLocation
    existing: ExistingRun | None = None  # a rerun: the run Ray Train restores
    resume: str | None = None  # ray.resume_from's checkpoint (a new run), on `resume_filesystem`
    resume_filesystem: Any = None  # None: a local path

    @property
    def finished(self) -> bool:
        return self.existing is not None and self.existing.finished


def validate_job(config: TrainJobConfig) -> JobPlan:
    """Every check that can fail before a worker starts; returns the data, the run and where it starts.

    Raises `ConfigError` naming the key to change: missing files, an empty split, an unreachable or read-only
    ``ray.storage_path``, an existing run (same name) or a resume checkpoint that does not fit the config
    (model/text settings, feature size, epochs), a GloVe file of the wrong dimension, a batch that does not
    split over the workers, more workers than the cluster's CPUs or GPUs (on an autoscaling cluster: after
    waiting ``ray.resource_timeout_s`` for them).
    """
    from imgcap.dataset import prepare_training_data
    from imgcap.train import build_model, check_sampled_softmax, initial_model

    for key, path in (("data.captions", config.data.captions), ("data.features", config.data.features),
                      ("data.train_split", config.data.train_split), ("data.dev_split", config.data.dev_split),
                      ("model.glove_path", config.model.glove_path)):
        _require_file(key, path)
    for phase in training_phases(config):
        key = "train.batch_size" if phase.name == "xe" else "scst.batch_size"
        if phase.config.batch_size % config.ray.num_workers:
            raise ConfigError(f"{key} = {phase.config.batch_size} (the global batch) must be divisible by "
                              f"ray.num_workers = {config.ray.num_workers}; change one of them")
    run = _run_location(config)
    _check_storage(run)
    existing = _existing_run(config, run)
    finished = existing is not None and _run_is_finished(existing.meta, config)
    if existing is not None:
        existing.finished = finished
    if not finished:
        _check_cluster(config, wait=False)  # a fixed cluster without the resources: refused now

    resume, resume_fs, meta, vocab = None, None, None, None
    if existing is not None:
        meta, vocab = existing.meta, existing.vocab
        if config.ray.resume_from:
            log.info("the run %s exists: it continues from its own latest checkpoint %s and ray.resume_from (%s) "
                     "is not used", run.name, run.display(existing.checkpoint), config.ray.resume_from)
    elif config.ray.resume_from:
        resume, resume_fs, meta, vocab = _resume_checkpoint(config)
    else:
        start = initial_model(config)  # scst.init_from: its vocabulary (the workers load its weights)
        if start is not None:
            vocab, meta = start.vocab, {"feature_dim": start.feature_dim}
    try:
        data = prepare_training_data(config.data, config.text, vocab)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data: {exc}") from None
    if meta is not None and meta["feature_dim"] != data.features.dim:
        source = (f"the existing run {run.name} in {run.storage_uri}" if existing is not None
                  else f"the checkpoint {resume}" if resume else f"scst.init_from ({config.scst.init_from})")
        fix = ("or choose another output_dir or ray.run_name to start a new run" if existing is not None
               else "or drop ray.resume_from" if resume else "or point scst.init_from at a model of these features")
        raise ConfigError(f"data.features has {data.features.dim}-d features but {source} was trained on "
                          f"{meta['feature_dim']}-d ones; use the features of the same backbone (data.features) "
                          f"{fix}")
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
    if not finished:
        _check_cluster(config)  # last: on an autoscaling cluster this may wait ray.resource_timeout_s
    return JobPlan(data, run, existing, resume, resume_fs)


def _resume_checkpoint(config: TrainJobConfig) -> tuple[str, Any, dict[str, Any], Vocabulary]:
    """``ray.resume_from``'s latest checkpoint (a path on its filesystem; the filesystem, None when local),
    its meta and vocabulary, checked against the config."""
    location = config.ray.resume_from
    try:
        filesystem, root = _resolve_filesystem(location, config.ray.storage_endpoint_url)
        present = _exists(filesystem, root)
    except Exception as exc:
        raise ConfigError(f"ray.resume_from: cannot open {location}: {exc}; point it at a checkpoint, run or output "
                          f"directory of an earlier run") from None
    if not present:
        raise ConfigError(f"ray.resume_from: {location} does not exist; point it at a checkpoint, "
                          f"run or output directory of an earlier run")
    checkpoint = find_latest_checkpoint(root, filesystem)
    if checkpoint is None:
        raise ConfigError(f"ray.resume_from: no imgcap checkpoint ({CHECKPOINT_META}) under "
                          f"{location}; point it at a checkpoint, run or output directory")
    local = _is_local(location)
    shown = checkpoint if local else f"{location.partition('://')[0]}://{checkpoint}"
    meta, vocab = _check_resume(config, checkpoint, filesystem, label=f"the checkpoint {shown}")
    if _run_is_finished(meta, config):
        table = "train" if meta["phase"] == "xe" else "scst"
        raise ConfigError(f"the checkpoint {shown} is at {meta['phase']} epoch {meta['epoch']} (best {meta['best_epoch']}) "
                          f"and its phase is done ({table}.epochs = {getattr(config, table).epochs}, "
                          f"{table}.patience = {getattr(config, table).patience}): nothing left to train; raise "
                          f"{table}.epochs or {table}.patience to continue"
                          + ("" if config.scst.enabled else ", or set scst.enabled = true to fine-tune it"))
    return checkpoint, (None if local else filesystem), meta, vocab


def train_on_ray(config: TrainJobConfig) -> DistributedTrainResult:
    """The Ray Train job: validate, train on ``ray.num_workers`` workers, write the bundle and the reports.

    Writes into ``config.output_dir``: ``bundle/`` (best epoch; what `jobs/caption.py` loads),
    ``history.csv`` and ``dev_report.json``, like `imgcap.train.train_captioner`; Ray Train's run directory
    (checkpoints, per-report metrics) is ``<ray.storage_path>/<run name>`` (default
    ``<output_dir>/ray_results/train-<output_dir name>-<hash>``). Run again, the job continues that run, or
    only rewrites the outputs when the run has finished (see the module docstring).
    """
    import_tensorflow()  # ray.train.tensorflow and imgcap.train import it: without CPU banners
    import ray
    from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from imgcap.train import build_model, checkpoint_best_weights, training_provenance, write_training_outputs

    if not ray.is_initialized():
        from imgcap.runtime import init_ray

        init_ray()
    plan = validate_job(config)
    data, run, existing = plan.data, plan.run, plan.existing
    resume_shown = None
    if plan.resume:
        resume_shown = plan.resume if plan.resume_filesystem is None else \
            f"{config.ray.resume_from.partition('://')[0]}://{plan.resume}"
    if plan.finished:
        log.info("the Ray Train run %s is already finished (%s epoch %d, best epoch %d): no training; the outputs "
                 "are written from its latest checkpoint %s", run.uri, existing.meta["phase"], existing.meta["epoch"],
                 existing.meta["best_epoch"], run.display(existing.checkpoint))
        result = Result.from_path(run.path, storage_filesystem=run.filesystem)
    else:
        log.info("Ray Train: %d worker(s) x batch %d (global batch %d); vocabulary %d words; %d train / %d dev "
                 "images; run %s%s", config.ray.num_workers, config.train.batch_size // config.ray.num_workers,
                 config.train.batch_size, len(data.vocab), len(data.train_ids), len(data.dev_ids), run.uri,
                 f"; continuing it from {run.display(existing.checkpoint)}" if existing
                 else f"; resuming {resume_shown}" if resume_shown else "")
        select_by = training_phases(config)[-1].config.select_by  # Ray keeps checkpoints by the last phase's score
        score = {"bleu": ("dev_bleu4", "max"), "cider": ("dev_cider", "max"), "loss": ("dev_loss", "min")}[select_by]
        trainer = TensorflowTrainer(
            train_loop_per_worker,
            train_loop_config={"job": config_to_dict(config), "vocab": data.vocab.to_json(),
                               "resume_checkpoint": plan.resume, "resume_filesystem": plan.resume_filesystem,
                               "fail_once": os.environ.get(FAIL_ONCE_ENV)},
            scaling_config=ScalingConfig(num_workers=config.ray.num_workers, use_gpu=config.ray.use_gpu,
                                         resources_per_worker=_worker_bundle(config)),
            run_config=RunConfig(
                name=run.name,
                # A URI goes to Ray Train as its filesystem and the prefix-stripped path (V2's StorageContext).
                storage_path=run.storage_path if not run.local else run.storage_uri,
                storage_filesystem=None if run.local else run.filesystem,
                checkpoint_config=CheckpointConfig(
                    num_to_keep=config.ray.checkpoints_to_keep,
                    checkpoint_score_attribute=score[0], checkpoint_score_order=score[1]),
                # controller_failure_limit=-1 (V2's default, explicit here): a worker group whose placement
                # group is not ready in RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S is retried without limit, so
                # scheduling never fails while an autoscaler is still adding nodes (see the module docstring).
                failure_config=FailureConfig(max_failures=config.ray.max_failures, controller_failure_limit=-1)),
        )
        try:
            result = trainer.fit()
        except Exception as exc:  # ray.train.TrainingFailedError and friends
            raise RuntimeError(f"the Ray Train run {run.name} failed (ray.max_failures = {config.ray.max_failures}): "
                               f"{exc}\nIts checkpoints are in {run.uri}; rerun the same job (same output_dir and "
                               f"ray.run_name) to continue from the latest one") from exc
    if result.checkpoint is None:
        raise RuntimeError(f"the Ray Train run {run.uri} finished without a checkpoint")

    model = build_model(config.model, data.vocab, data.features.dim, config.train.seed)
    with result.checkpoint.as_directory() as directory:
        state = TrainingState.from_meta(read_checkpoint_meta(directory))
        model.set_weights(checkpoint_best_weights(directory, model))
    run_dir = result.path if run.local else run.display(result.path)
    continued = run.display(existing.checkpoint) if existing is not None else None
    init_from = config.scst.init_from if config.scst.enabled else None
    provenance = {**training_provenance(config, state, init_from), "ray_run": run_dir, "resumed_from": resume_shown,
                  "continued_from": continued}
    bundle_dir, report = write_training_outputs(config, model, data, state.history, provenance)
    best = [run.display(c.path) for c, _ in (result.best_checkpoints or [])]
    return DistributedTrainResult(bundle_dir, state.history, state.best_epoch, report, run_dir,
                                  run.display(result.checkpoint.path), best, config.ray.num_workers,
                                  resume_shown, dict(result.metrics or {}), continued, not plan.finished)
