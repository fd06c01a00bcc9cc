"""The Ray Train worker loop: MultiWorkerMirroredStrategy, the shared phase loop, one checkpoint per epoch.

It runs in Ray Train's workers: the TensorFlow-backed modules are imported inside the loop on purpose, so a
driver that pickles the loop imports none of them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from imgcap.config.loader import config_from_dict
from imgcap.config.training import TrainJobConfig
from imgcap.data.text import Vocabulary
from imgcap.runtime.logs import import_tensorflow
from imgcap.train.state import (
    Phase,
    TrainingState,
    read_checkpoint_meta,
    training_phases,
)

log = logging.getLogger(__name__)


FAIL_ONCE_ENV = "IMGCAP_TEST_FAIL_ONCE"


def fail_once_hook(spec: str | None, phase: str, epoch: int, rank: int, world_size: int):
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


def checkpoint_name(phase: str, epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}" if phase == "xe" else f"checkpoint_{phase}_epoch_{epoch:04d}"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard, MultiWorkerMirroredStrategy, the shared phase loop, per-epoch report."""
    tf = import_tensorflow()  # before the imports below bring it in: no CPU banners
    import ray.train

    from imgcap.data.dataset import prepare_training_data
    from imgcap.train.batches import phase_batches, phase_sizes
    from imgcap.train.evaluation import dev_evaluator
    from imgcap.train.loop import train_phase
    from imgcap.train.trainer import CaptionTrainer, write_checkpoint
    from imgcap.train.warm_start import initial_model, start_model

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
                             on_step=lambda epoch: fail_once_hook(loop_config.get("fail_once"), phase.name, epoch,
                                                                   rank, world_size))
        for metrics in epochs:
            reported = {k: v for k, v in metrics.as_dict().items() if v is not None}
            reported.update(best_epoch=state.best_epoch, world_size=world_size, started_at_phase=started_at[0],
                            started_at_epoch=started_at[1], early_stop=state.stops_early(phase.config))
            # resumed_from: the run's origin (ray.resume_from), kept in every checkpoint so a rerun that
            # continues the run still records it in its bundle
            meta = {"job": loop_config["job"], "feature_dim": data.features.dim, "regions": data.regions,
                    "vocab_size": len(vocab), "resumed_from": loop_config.get("resumed_from"),
                    "world_size": world_size, "saved_at": time.time()}
            with tempfile.TemporaryDirectory() as tmp:
                # Every worker writes the checkpoint (TensorFlow's rule for MultiWorkerMirroredStrategy: saving
                # may read variables across workers); only the chief's goes to Ray Train.
                write_checkpoint(Path(tmp), trainer, state, vocab, meta)
                checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
                ray.train.report(reported, checkpoint=checkpoint,
                                 checkpoint_dir_name=checkpoint_name(phase.name, metrics.epoch))
