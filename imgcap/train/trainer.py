"""The training step of both phases (alone or under tf.distribute), its optimizer and its checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from imgcap.config.training import TrainConfig
from imgcap.data.dataset import Batch
from imgcap.data.text import Vocabulary
from imgcap.model.decoder import Decoder
from imgcap.train.losses import (
    check_sampled_softmax,
    masked_token_loss,
    sampled_token_loss,
)
from imgcap.train.state import (
    CHECKPOINT_META,
    CHECKPOINT_STATE,
    VOCAB_FILE,
    TrainingState,
)


class CaptionTrainer:
    """One phase of fitting a decoder (`imgcap.model.decoder.Decoder`): its optimizer, the compiled step, the best epoch's weights.

    Create it (and so the model and optimizer) inside ``strategy.scope()`` when a strategy is used; a new
    phase gets a new trainer (a fresh optimizer) for the same model. `dropout` = False runs the step's
    forward pass without dropout (`scst.dropout = false`, `imgcap.train.state.Phase.dropout`).
    """

    def __init__(self, model: Decoder, config: TrainConfig,
                 strategy: tf.distribute.Strategy | None = None, dropout: bool = True) -> None:
        self.model, self.config, self.dropout = model, config, dropout
        check_sampled_softmax(config, model.vocab_size)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate, use_ema=config.weight_ema > 0,
                                               ema_momentum=config.weight_ema or 0.99)
        self.optimizer.build(model.trainable_variables)
        # The weights of the phase's best dev epoch so far (as evaluated: the moving average when it is on);
        # a checkpoint carries them, so the bundle never depends on which checkpoints were kept.
        self.best_weights = [tf.Variable(w, trainable=False, name=f"best_{k}")
                             for k, w in enumerate(model.get_weights())]
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=self.optimizer, best=self.best_weights)
        spec = [tf.TensorSpec([None, model.feature_dim], tf.float32), tf.TensorSpec([None, None], tf.int32),
                tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.float32)]
        self._train_step = tf.function(self._distributed_step, input_signature=spec)

    def _replica_step(self, features: tf.Tensor, inputs: tf.Tensor, targets: tf.Tensor,
                      weights: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            # `penalty`: the decoder's own regulariser (attention: doubly stochastic; merge/inject: 0)
            hidden, penalty = self.model.forward((features, inputs), training=self.dropout)
            if self.config.sampled_softmax:
                total, count = sampled_token_loss(hidden, targets, weights, self.model.classifier,
                                                  self.config.sampled_softmax)
            else:
                total, count = masked_token_loss(self.model.classifier(hidden), targets, weights,
                                                 self.config.label_smoothing)
            loss = total / tf.maximum(count, 1.0) + penalty
            scaled = loss / self.strategy.num_replicas_in_sync
        variables = self.model.trainable_variables
        # The gradients here are of loss / replicas: clipping them at clip_norm / replicas clips each replica's
        # gradient at clip_norm, the same scale as one process (identical when there is one replica).
        gradients, _ = tf.clip_by_global_norm(tape.gradient(scaled, variables),
                                              self.config.clip_norm / self.strategy.num_replicas_in_sync)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return loss

    def _distributed_step(self, features: tf.Tensor, inputs: tf.Tensor, targets: tf.Tensor,
                          weights: tf.Tensor) -> tf.Tensor:
        losses = self.strategy.run(self._replica_step, args=(features, inputs, targets, weights))
        return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)

    def train_step(self, batch: Batch) -> float:
        """One optimisation step on `batch`; its loss (averaged over the replicas)."""
        return float(self._train_step(batch.features, batch.inputs, batch.targets, batch.weights))

    def train_epoch(self, batches: Iterable[Batch], total: int, progress: bool = False,
                    on_step: Callable[[int, int], None] | None = None) -> float:
        """One pass over `batches` (`total` of them); returns the mean training loss.

        `on_step(step, total)` runs before each step (a test hook: fault injection mid-epoch).
        """
        bar = keras.utils.Progbar(total, stateful_metrics=["loss"], verbose=1) if progress else None
        losses = []
        for k, batch in enumerate(batches):
            if on_step is not None:
                on_step(k, total)
            losses.append(self.train_step(batch))
            if bar is not None:
                bar.update(k + 1, [("loss", float(np.mean(losses[-50:])))])
        return float(np.mean(losses))

    @contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """Inside the block the model holds the weights to evaluate and keep: the moving average of the weights
        when ``weight_ema`` > 0 (the trained weights come back on exit), else the weights as trained."""
        if not self.config.weight_ema:
            yield
            return
        variables = self.model.trainable_variables
        trained = [v.numpy() for v in variables]
        self.optimizer.finalize_variable_values(variables)
        try:
            yield
        finally:
            for variable, value in zip(variables, trained):
                variable.assign(value)

    def keep_best(self) -> None:
        """The model's weights as they are now become the best weights (call inside `evaluation_weights`)."""
        for best, value in zip(self.best_weights, self.model.get_weights()):
            best.assign(value)

    def restore_best(self) -> None:
        """The model takes the best weights (the end of a phase)."""
        self.model.set_weights([w.numpy() for w in self.best_weights])

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate.numpy())

    def set_learning_rate(self, value: float) -> None:
        self.optimizer.learning_rate.assign(value)

    def save(self, directory: str | Path) -> None:
        """Model weights, optimizer variables (step count, Adam moments, weight average) and the best weights,
        as a `tf.train.Checkpoint` in `directory` (``state.index``, ``state.data-*``)."""
        self._checkpoint.write(str(Path(directory) / CHECKPOINT_STATE))

    def restore(self, directory: str | Path) -> None:
        """Restore what `save` wrote; every variable must match (same model config, vocabulary, phase)."""
        self._checkpoint.read(str(Path(directory) / CHECKPOINT_STATE)).assert_consumed()


def checkpoint_best_weights(directory: str | Path, model: Decoder) -> list[np.ndarray]:
    """The best weights stored in a checkpoint, for `model`'s shapes (nothing else is read)."""
    best = [tf.Variable(tf.zeros_like(w)) for w in model.get_weights()]
    tf.train.Checkpoint(best=best).read(str(Path(directory) / CHECKPOINT_STATE)).expect_partial()
    return [w.numpy() for w in best]


def write_checkpoint(directory: Path, trainer: CaptionTrainer, state: TrainingState, vocab: Vocabulary,
                     meta: dict[str, Any]) -> None:
    """A whole checkpoint: the trainer's variables, the vocabulary, and the state with `meta` (job config,
    sizes) as JSON, written last so a reader that sees the JSON sees a complete checkpoint."""
    trainer.save(directory)
    vocab.save(directory / VOCAB_FILE)
    (directory / CHECKPOINT_META).write_text(json.dumps({**state.to_meta(), **meta}, indent=2, default=str),
                                             encoding="utf-8")
