"""Training the caption decoder: a custom TensorFlow loop that runs alone or under tf.distribute.

A run has up to two phases (`imgcap.train.state`): cross-entropy training (teacher forcing over whole
captions, sparse cross-entropy that ignores `<pad>`, optionally label-smoothed or a sampled softmax) and then,
with ``[scst]``, self-critical training on the CIDEr-D reward of sampled captions (`imgcap.train.scst`). Both are the
same step: a loss per caption, weighted (1 for a reference caption, the advantage for a sampled one),
gradient clipping, Adam with a per-epoch decay, an optional moving average of the weights, and model
selection on the dev split (dev loss, or greedy dev BLEU-4 or CIDEr-D) with early stopping. The single-process
trainer (`imgcap.train.local.train_captioner`) and the Ray Train workers (`imgcap.train.ray_job`) run the same `train_phase` epoch
loop and the same `TrainingState`; checkpoints are `tf.train.Checkpoint`s of the model, the optimizer and the
best epoch's weights.

The step is written once for any `tf.distribute.Strategy`: `strategy.run` inside a `tf.function`, with each
replica's loss divided by the number of replicas so that the all-reduced (summed) gradients are the average
over replicas. This is what runs under Ray Train's MultiWorkerMirroredStrategy, where Keras 3 `model.fit`
does not (docs/ray-train.md).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator

from imgcap.train.batches import BatchSource
from imgcap.train.evaluation import DevEvaluator
from imgcap.train.state import EpochMetrics, TrainingState
from imgcap.train.trainer import CaptionTrainer

log = logging.getLogger(__name__)


def train_phase(trainer: CaptionTrainer, evaluator: DevEvaluator, state: TrainingState, batches: BatchSource, *,
                num_images: int, num_captions: int, progress: bool = False,
                on_step: Callable[[int], Callable[[int, int], None] | None] | None = None) -> Iterator[EpochMetrics]:
    """The epochs of the current phase (``state.phase``) from ``state.epoch`` on, one `EpochMetrics` each.

    Every epoch: the learning rate ``learning_rate * lr_decay ** epoch``, one pass over the epoch's batches,
    the dev evaluation, the state's record (a better dev score keeps the weights as the best), until the phase
    has its epochs or stops early. The caller decides what to do between epochs (the Ray Train worker reports
    and checkpoints) and calls ``trainer.restore_best()`` at the end. `num_images` / `num_captions` count the
    whole (global) training set, so images/s is the job's throughput; `on_step(epoch)` gives a per-step hook.
    """
    config = trainer.config
    while not state.phase_done(config):
        epoch = state.epoch
        trainer.set_learning_rate(config.learning_rate * config.lr_decay ** epoch)
        epoch_batches, total = batches.epoch(epoch)
        started = time.perf_counter()
        train_loss = trainer.train_epoch(epoch_batches, total, progress, on_step(epoch) if on_step else None)
        seconds = time.perf_counter() - started
        with trainer.evaluation_weights():
            dev = evaluator.evaluate()
            metrics = EpochMetrics(state.phase, epoch + 1, train_loss, dev.loss, dev.bleu4, dev.cider,
                                   trainer.learning_rate, seconds, num_images / seconds, num_captions / seconds,
                                   total, batches.epoch_reward())
            if state.record(metrics, config.select_by):
                trainer.keep_best()
        log.info("%s", metrics.format(config.epochs))
        if state.stops_early(config):
            log.info("early stop: no better dev %s for %d epochs", config.select_by, config.patience)
        yield metrics


def fit(trainer: CaptionTrainer, evaluator: DevEvaluator, state: TrainingState, batches: BatchSource, *,
        num_images: int, num_captions: int, progress: bool | None = None) -> TrainingState:
    """Train the current phase to its end in this process; the model ends with the phase's best weights."""
    progress = sys.stderr.isatty() if progress is None else progress
    for _ in train_phase(trainer, evaluator, state, batches, num_images=num_images, num_captions=num_captions,
                         progress=progress):
        pass
    trainer.restore_best()
    return state


