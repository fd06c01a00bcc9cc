"""The Ray Train job (jobs/train.py): validate everything on the driver, train the decoder data-parallel on
``ray.num_workers`` workers, then write the bundle and reports as `imgcap.train.local` does.

How the driver, workers, checkpoints, reruns, resume, storage and autoscaling fit together is written up in
docs/ray-train.md. TensorFlow-importing modules are imported inside the functions on purpose, after
`import_tensorflow`, so validating a config neither loads TensorFlow nor prints its banners.
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
from imgcap.train.progress import EpochWatch
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
    epochs_done: int = 0  # epochs in the history the run starts from (printed before, not again)

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
        build_model(config.model, data.vocab, data.features.dim, config.train.seed, data.regions)  # e.g. GloVe dimension
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from None
    if not finished:
        check_cluster(config)  # last: on an autoscaling cluster this may wait ray.resource_timeout_s
    epochs_done = len(meta.get("history", [])) if meta is not None else 0
    return JobPlan(data, run, existing, resume, resume_fs, epochs_done)


def train_on_ray(config: TrainJobConfig) -> DistributedTrainResult:
    """The Ray Train job: validate, train on ``ray.num_workers`` workers, write the bundle and the reports.

    Writes into ``config.output_dir``: ``bundle/`` (best epoch; what `jobs/caption.py` loads),
    ``history.csv`` and ``dev_report.json``, like `imgcap.train.local.train_captioner`; Ray Train's run directory
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
    elif existing is not None:  # a rerun: where the run itself started, as its checkpoints record it
        resume_shown = existing.meta.get("resumed_from")
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
                               "resumed_from": resume_shown,
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
            with EpochWatch(config, run.filesystem, run.path, seen=plan.epochs_done):
                result = trainer.fit()
        except Exception as exc:  # ray.train.TrainingFailedError and friends
            raise RuntimeError(f"the Ray Train run {run.name} failed (ray.max_failures = {config.ray.max_failures}): "
                               f"{exc}\nIts checkpoints are in {run.uri}; rerun the same job (same output_dir and "
                               f"ray.run_name) to continue from the latest one") from exc
    if result.checkpoint is None:
        raise RuntimeError(f"the Ray Train run {run.uri} finished without a checkpoint")

    model = build_model(config.model, data.vocab, data.features.dim, config.train.seed, data.regions)
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
