"""Data-parallel training of the caption decoder on Ray Train (jobs/train.py).

The same job runs as one process on a laptop and as N workers (CPU or GPU) on a cluster; only ``[ray]`` in the
config changes. Written for the Ray Train V2 API, the default in Ray 2.60 (``RAY_TRAIN_V2_ENABLED``):

- **Driver** (`train_on_ray`): validates everything before a worker starts (files, vocabulary and feature
  sizes, the storage, an existing run or a resume checkpoint, workers vs the cluster's CPUs/GPUs, the batch
  split) and raises `ConfigError` with the key to change (an autoscaling cluster is waited for, see below);
  then runs a ``TensorflowTrainer`` and, when it has finished, writes the model bundle
  from the best epoch's weights, ``history.csv`` and ``dev_report.json`` exactly as the single-process
  `imgcap.train.loop.train_captioner` does.
- **Workers** (`train_loop_per_worker`): ``MultiWorkerMirroredStrategy`` (Ray sets ``TF_CONFIG``), the model and
  the `CaptionTrainer` built in its scope, and the phase loop of `imgcap.train.loop.train_phase` (the one `fit` uses):
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

Self-critical training (``[scst]``, `imgcap.train.scst`) is the second phase of the same loop: each worker samples
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
checkpoints Ray kept); ``vocab.json``; ``imgcap_checkpoint.json`` (the `imgcap.train.state.TrainingState`:
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
imgcap output is (`imgcap.io.sources.filesystem_for`). ``ray.storage_endpoint_url`` names an S3-compatible
endpoint (MinIO, Ceph, moto), as does ``AWS_ENDPOINT_URL``. The driver resolves the filesystem once, checks that the run
directory is reachable and writable (a probe object written and deleted; for a local path nothing is created
before the config is known to be valid), reads existing runs and checkpoints through it, and hands it to
Ray Train as ``RunConfig(storage_filesystem=...)`` with the prefix-stripped path (what V2's
``StorageContext`` expects, ``ray/train/v2/_internal/execution/storage.py``). Workers and the Ray Train
controller get the filesystem pickled; credentials come from their own environment (AWS_* variables,
instance role).

Autoscaling clusters: the driver compares the workers' CPUs/GPUs with ``ray.cluster_resources()``. When they
are short and the cluster cannot grow (a local ``ray.init()``, a fixed cluster) it refuses at once. When an
autoscaler can still add nodes (`imgcap.runtime.cluster.cluster_can_grow`) it logs what is missing and waits, at most
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

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgcap.config.loader import ConfigError, config_to_dict
from imgcap.config.training import TrainJobConfig
from imgcap.runtime.logs import import_tensorflow
from imgcap.train.ray_cluster import check_cluster, worker_bundle
from imgcap.train.ray_worker import FAIL_ONCE_ENV, train_loop_per_worker
from imgcap.train.resume import (
    ExistingRun,
    existing_run,
    resume_checkpoint,
    run_is_finished,
)
from imgcap.train.run_storage import RunLocation, check_storage, is_local, run_location
from imgcap.train.state import (
    TrainingState,
    best_of,
    describe_best,
    read_checkpoint_meta,
    training_phases,
)

log = logging.getLogger(__name__)


# --- storage: local paths and pyarrow filesystem URIs


# --- the worker loop


# --- the driver


@dataclass
class DistributedTrainResult:
    """What `train_on_ray` produced: the bundle, the per-epoch history, the dev evaluation and the Ray run."""

    bundle_path: Path
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
        lines = [f"bundle -> {self.bundle_path}",
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
    if is_local(path) and not Path(path).exists():
        raise ConfigError(f"{key}: {path} does not exist; set {key} to an existing file")


# --- the cluster: enough CPUs/GPUs now, or an autoscaler to deliver them


# --- an existing run, a resume checkpoint


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
    from imgcap.data.dataset import prepare_training_data
    from imgcap.model.decoder import build_model
    from imgcap.train.losses import check_sampled_softmax
    from imgcap.train.warm_start import initial_model

    for key, path in (("data.captions", config.data.captions), ("data.features", config.data.features),
                      ("data.train_split", config.data.train_split), ("data.dev_split", config.data.dev_split),
                      ("model.glove_path", config.model.glove_path)):
        _require_file(key, path)
    for phase in training_phases(config):
        key = "train.batch_size" if phase.name == "xe" else "scst.batch_size"
        if phase.config.batch_size % config.ray.num_workers:
            raise ConfigError(f"{key} = {phase.config.batch_size} (the global batch) must be divisible by "
                              f"ray.num_workers = {config.ray.num_workers}; change one of them")
    run = run_location(config)
    check_storage(run)
    existing = existing_run(config, run)
    finished = existing is not None and run_is_finished(existing.meta, config)
    if existing is not None:
        existing.finished = finished
    if not finished:
        check_cluster(config, wait=False)  # a fixed cluster without the resources: refused now

    resume, resume_fs, meta, vocab = None, None, None, None
    if existing is not None:
        meta, vocab = existing.meta, existing.vocab
        if config.ray.resume_from:
            log.info("the run %s exists: it continues from its own latest checkpoint %s and ray.resume_from (%s) "
                     "is not used", run.name, run.display(existing.checkpoint), config.ray.resume_from)
    elif config.ray.resume_from:
        resume, resume_fs, meta, vocab = resume_checkpoint(config)
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
        check_cluster(config)  # last: on an autoscaling cluster this may wait ray.resource_timeout_s
    return JobPlan(data, run, existing, resume, resume_fs)


def train_on_ray(config: TrainJobConfig) -> DistributedTrainResult:
    """The Ray Train job: validate, train on ``ray.num_workers`` workers, write the bundle and the reports.

    Writes into ``config.output_dir``: ``bundle/`` (best epoch; what `jobs/caption.py` loads),
    ``history.csv`` and ``dev_report.json``, like `imgcap.train.loop.train_captioner`; Ray Train's run directory
    (checkpoints, per-report metrics) is ``<ray.storage_path>/<run name>`` (default
    ``<output_dir>/ray_results/train-<output_dir name>-<hash>``). Run again, the job continues that run, or
    only rewrites the outputs when the run has finished (see the module docstring).
    """
    import_tensorflow()  # ray.train.tensorflow and imgcap.train.loop import it: without CPU banners
    import ray
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        Result,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.tensorflow import TensorflowTrainer

    from imgcap.model.decoder import build_model
    from imgcap.train.outputs import training_provenance, write_training_outputs
    from imgcap.train.trainer import checkpoint_best_weights

    if not ray.is_initialized():
        from imgcap.runtime.cluster import init_ray

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
                                         resources_per_worker=worker_bundle(config)),
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
    bundle_path, report = write_training_outputs(config, model, data, state.history, provenance)
    best = [run.display(c.path) for c, _ in (result.best_checkpoints or [])]
    return DistributedTrainResult(bundle_path, state.history, state.best_epoch, report, run_dir,
                                  run.display(result.checkpoint.path), best, config.ray.num_workers,
                                  resume_shown, dict(result.metrics or {}), continued, not plan.finished)
