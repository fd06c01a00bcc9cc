"""Training the caption decoder: a custom TensorFlow loop that runs alone or under tf.distribute.

A run has up to two phases (`imgcap.training_state`): cross-entropy training (teacher forcing over whole
captions, sparse cross-entropy that ignores `<pad>`, optionally label-smoothed or a sampled softmax) and then,
with ``[scst]``, self-critical training on the CIDEr-D reward of sampled captions (`imgcap.scst`). Both are the
same step: a loss per caption, weighted (1 for a reference caption, the advantage for a sampled one),
gradient clipping, Adam with a per-epoch decay, an optional moving average of the weights, and model
selection on the dev split (dev loss, or greedy dev BLEU-4 or CIDEr-D) with early stopping. The single-process
trainer (`train_captioner`) and the Ray Train workers (`imgcap.distributed`) run the same `train_phase` epoch
loop and the same `TrainingState`; checkpoints are `tf.train.Checkpoint`s of the model, the optimizer and the
best epoch's weights.

The step is written once for any `tf.distribute.Strategy`: `strategy.run` inside a `tf.function`, with each
replica's loss divided by the number of replicas so that the all-reduced (summed) gradients are the average
over replicas. This is what runs under Ray Train's MultiWorkerMirroredStrategy, where Keras 3 `model.fit`
does not (see README).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import keras
import numpy as np
import tensorflow as tf

from imgcap.beam import GreedyDecoder
from imgcap.bundle import CaptionBundle, load_bundle
from imgcap.cider import CiderD
from imgcap.config import ConfigError, ModelConfig, TrainConfig, TrainJobConfig, config_to_dict
from imgcap.dataset import Batch, CaptionExamples, TrainingData, iterate_batches, prepare_training_data
from imgcap.embedding import EmbeddingSpec
from imgcap.evaluate import EvaluationReport, coco_available, evaluate_captions, nltk_corpus_bleu
from imgcap.glove import glove_embedding_matrix
from imgcap.model import CaptionModel
from imgcap.scst import SelfCriticalBatches
from imgcap.text import PAD_ID, Vocabulary
from imgcap.training_state import (CHECKPOINT_META, CHECKPOINT_STATE, VOCAB_FILE, EpochMetrics, Phase,
                                   TrainingState, best_of, describe_best, find_latest_checkpoint,
                                   read_checkpoint_meta, training_phases)

log = logging.getLogger(__name__)


def masked_token_loss(logits: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor | None = None,
                      label_smoothing: float = 0.0) -> tuple[tf.Tensor, tf.Tensor]:
    """(sum of per-token losses times their caption's weight, number of tokens) over non-`<pad>` targets.

    With label smoothing e, each token's loss is (1 - e) * NLL + e * mean over the vocabulary of -log p.
    """
    log_probs = tf.nn.log_softmax(logits)
    nll = -tf.gather(log_probs, targets, batch_dims=2)
    if label_smoothing > 0:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * tf.reduce_mean(log_probs, axis=-1)
    mask = tf.cast(tf.not_equal(targets, PAD_ID), nll.dtype)
    weighted = mask if weights is None else mask * weights[:, None]
    return tf.reduce_sum(nll * weighted), tf.reduce_sum(mask)


def sampled_token_loss(hidden: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor, classifier: keras.layers.Dense,
                       num_sampled: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(sum of weighted per-token losses, number of tokens) of a sampled softmax over non-`<pad>` targets.

    Each token's true word competes with `num_sampled` words drawn once per step from a log-uniform (Zipf)
    distribution over the ids, which fits the vocabulary's order by descending frequency
    (`tf.nn.sampled_softmax_loss`, with the usual correction for the sampling probabilities). The classifier
    is applied to the true and the sampled words only: the cost of the output layer falls from the vocabulary
    size to `num_sampled` per token.
    """
    mask = tf.not_equal(targets, PAD_ID)
    losses = tf.nn.sampled_softmax_loss(
        weights=tf.transpose(classifier.kernel), biases=classifier.bias,
        labels=tf.cast(tf.boolean_mask(targets, mask), tf.int64)[:, None], inputs=tf.boolean_mask(hidden, mask),
        num_sampled=num_sampled, num_classes=classifier.units)
    token_weights = tf.boolean_mask(tf.broadcast_to(weights[:, None], tf.shape(targets)), mask)
    return tf.reduce_sum(losses * token_weights), tf.reduce_sum(tf.cast(mask, losses.dtype))


def check_sampled_softmax(config: TrainConfig, vocab_size: int) -> None:
    """Raise ValueError unless ``train.sampled_softmax`` is off or smaller than the vocabulary."""
    if config.sampled_softmax >= vocab_size:
        raise ValueError(f"train.sampled_softmax = {config.sampled_softmax} must be smaller than the vocabulary "
                         f"({vocab_size} words); lower it or use 0 (the full softmax)")


class CaptionTrainer:
    """One phase of fitting a `CaptionModel`: its optimizer, the compiled step, the best epoch's weights.

    Create it (and so the model and optimizer) inside ``strategy.scope()`` when a strategy is used; a new
    phase gets a new trainer (a fresh optimizer) for the same model. `dropout` = False runs the step's
    forward pass without dropout (`scst.dropout = false`, `imgcap.training_state.Phase.dropout`).
    """

    def __init__(self, model: CaptionModel, config: TrainConfig,
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
            if self.config.sampled_softmax:
                hidden = self.model.hidden_states((features, inputs), training=self.dropout)
                total, count = sampled_token_loss(hidden, targets, weights, self.model.classifier,
                                                  self.config.sampled_softmax)
            else:
                logits = self.model((features, inputs), training=self.dropout)
                total, count = masked_token_loss(logits, targets, weights, self.config.label_smoothing)
            loss = total / tf.maximum(count, 1.0)
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


def checkpoint_best_weights(directory: str | Path, model: CaptionModel) -> list[np.ndarray]:
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


@dataclass(frozen=True)
class DevScores:
    loss: float
    bleu4: float
    cider: float


class DevEvaluator:
    """Dev loss, greedy dev BLEU-4 and CIDEr-D of a model: what every epoch is judged by.

    Built once per model, so the greedy decoder's and the loss's graphs are traced once, not once per epoch.
    CIDEr-D's document frequencies are the dev references' (as coco-caption computes them).
    """

    def __init__(self, model: CaptionModel, vocab: Vocabulary, examples: CaptionExamples, features: np.ndarray,
                 dev_features: np.ndarray, dev_references: list[list[list[str]]], max_length: int = 30) -> None:
        self.model, self.vocab, self.examples, self.features = model, vocab, examples, features
        self.dev_features, self.dev_references = dev_features, dev_references
        self._greedy = GreedyDecoder(model, max_length, batch_size=512)
        self._cider = CiderD(dev_references)
        spec = [tf.TensorSpec([None, model.feature_dim], tf.float32), tf.TensorSpec([None, None], tf.int32),
                tf.TensorSpec([None, None], tf.int32)]
        self._loss_step = tf.function(lambda f, i, t: masked_token_loss(model((f, i), training=False), t),
                                      input_signature=spec)

    def loss(self, batch_size: int = 512) -> float:
        """Mean per-token cross-entropy (no smoothing, no dropout) over the dev captions."""
        total = count = 0.0
        for batch in iterate_batches(self.examples, self.features, batch_size):
            s, n = self._loss_step(batch.features, batch.inputs, batch.targets)
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    def greedy_captions(self) -> list[list[str]]:
        return [self.vocab.decode(t) for t in self._greedy.decode(self.dev_features).tokens]

    def evaluate(self) -> DevScores:
        captions = self.greedy_captions()
        return DevScores(self.loss(), nltk_corpus_bleu(self.dev_references, captions)[3],
                         float(self._cider.score_captions(captions).mean()))


class BatchSource(Protocol):
    """Where a phase's batches come from, epoch by epoch (`CaptionBatches`, `imgcap.scst.SelfCriticalBatches`)."""

    def epoch(self, epoch: int) -> tuple[Iterator[Batch], int]: ...

    def epoch_reward(self) -> float | None: ...


class CaptionBatches:
    """Cross-entropy batches: reference captions, length-bucketed (`imgcap.dataset.iterate_batches`)."""

    def __init__(self, examples: CaptionExamples, features: np.ndarray, batch_size: int,
                 rng_for_epoch: Callable[[int], np.random.Generator], num_batches: int | None = None) -> None:
        self.examples, self.features, self.batch_size = examples, features, batch_size
        self.num_batches, self._rng_for_epoch = num_batches, rng_for_epoch

    def epoch(self, epoch: int) -> tuple[Iterator[Batch], int]:
        total = self.num_batches or math.ceil(len(self.examples) / self.batch_size)
        return iterate_batches(self.examples, self.features, self.batch_size, self._rng_for_epoch(epoch),
                               self.num_batches), total

    def epoch_reward(self) -> float | None:
        return None


def phase_batches(phase: Phase, job: TrainJobConfig, data: TrainingData, model: CaptionModel, *,
                  rank: int = 0, world_size: int = 1,
                  rng_for_epoch: Callable[[int], np.random.Generator] | None = None) -> BatchSource:
    """The batches of `phase` for data-parallel worker `rank` of `world_size` (every world_size-th caption
    or image), each worker taking the same number of steps; the batch size is the phase's global batch."""
    batch_size = phase.config.batch_size // world_size
    if rng_for_epoch is None:
        rng_for_epoch = lambda epoch: np.random.default_rng([phase.config.seed, epoch, rank])  # noqa: E731
    features = data.features.features
    if phase.name == "xe":
        num_batches = max(math.ceil(len(data.train.shard(r, world_size)) / batch_size) for r in range(world_size))
        return CaptionBatches(data.train.shard(rank, world_size), features, batch_size, rng_for_epoch,
                              num_batches if world_size > 1 else None)
    rows = np.arange(len(data.train_ids))  # the training images are the first rows of the feature table
    num_batches = max(math.ceil(len(rows[r::world_size]) / batch_size) for r in range(world_size))
    reward = CiderD([data.train_references[i] for i in data.train_ids])
    return SelfCriticalBatches(model, data.vocab, reward, features, rows[rank::world_size], job.scst, batch_size,
                               rng_for_epoch, num_batches if world_size > 1 else None)


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
        reward = "" if metrics.train_reward is None else f", sample reward {metrics.train_reward:.4f}"
        log.info("%s epoch %d/%d: train loss %.4f%s, dev loss %.4f, dev BLEU-4 %.4f, dev CIDEr-D %.4f, %.1f s, "
                 "%.0f images/s", state.phase, epoch + 1, config.epochs, train_loss, reward, dev.loss, dev.bleu4,
                 dev.cider, seconds, metrics.images_per_second)
        if state.stops_early(config):
            log.info("early stop: no better dev %s for %d epochs", config.select_by, config.patience)
        yield metrics


def phase_sizes(phase: Phase, job: TrainJobConfig, data: TrainingData) -> tuple[int, int]:
    """(images, captions) one epoch of `phase` trains on, over all workers."""
    images = len(data.train_ids)
    return images, len(data.train) if phase.name == "xe" else images * job.scst.samples


def fit(trainer: CaptionTrainer, evaluator: DevEvaluator, state: TrainingState, batches: BatchSource, *,
        num_images: int, num_captions: int, progress: bool | None = None) -> TrainingState:
    """Train the current phase to its end in this process; the model ends with the phase's best weights."""
    progress = sys.stderr.isatty() if progress is None else progress
    for _ in train_phase(trainer, evaluator, state, batches, num_images=num_images, num_captions=num_captions,
                         progress=progress):
        pass
    trainer.restore_best()
    return state


def build_model(config: ModelConfig, vocab: Vocabulary, feature_dim: int, seed: int = 0) -> CaptionModel:
    """A fresh `CaptionModel`, its embedding initialised from GloVe when `config.glove_path` is set."""
    keras.utils.set_random_seed(seed)
    matrix = None
    if config.glove_path:
        matrix, covered = glove_embedding_matrix(config.glove_path, vocab, config.embedding_dim, seed)
        log.info("GloVe covers %d of %d vocabulary words", covered, len(vocab))
    return CaptionModel(config, len(vocab), feature_dim, embedding_matrix=matrix)


def dev_evaluator(config: TrainJobConfig, data: TrainingData, model: CaptionModel) -> DevEvaluator:
    """The `DevEvaluator` of a job's model on its dev split (greedy captions up to ``decode.max_length``)."""
    return DevEvaluator(model, data.vocab, data.dev, data.features.features,
                        data.features.select(data.dev_ids).features,
                        [data.dev_references[i] for i in data.dev_ids], config.decode.max_length)


@dataclass(frozen=True)
class InitialModel:
    """What self-critical training starts from when ``scst.init_from`` is set: a bundle's or checkpoint's
    vocabulary and weights."""

    source: str
    vocab: Vocabulary
    weights: list[np.ndarray]
    feature_dim: int


def _check_same_model(config: TrainJobConfig, model: dict[str, Any], text: dict[str, Any], source: str) -> None:
    for table, saved in (("model", model), ("text", text)):
        ours = config_to_dict(getattr(config, table))
        for key, value in saved.items():
            if key != "glove_path" and ours.get(key) != value:
                raise ConfigError(f"{table}.{key} is {ours.get(key)!r} but scst.init_from ({source}) was trained "
                                  f"with {value!r}; set {table}.{key} = {value!r}")


def initial_model(config: TrainJobConfig) -> InitialModel | None:
    """``scst.init_from`` loaded and checked against the config (model and text settings), or None.

    A bundle directory or URI (``bundle.json``; one model, not an ensemble) gives its model's weights; a local
    checkpoint, Ray run or output directory gives the best weights of its latest checkpoint.
    """
    source = config.scst.init_from
    if not (config.scst.enabled and source):
        return None
    fix = "point scst.init_from at a model bundle or a checkpoint, run or output directory of cross-entropy training"
    if "://" in source or (Path(source) / "bundle.json").is_file():
        try:
            bundle = load_bundle(source)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"scst.init_from: cannot load the bundle {source}: {exc}; {fix}") from None
        if len(bundle.members) != 1:
            raise ConfigError(f"scst.init_from: {source} is an ensemble of {len(bundle.members)} models; "
                              f"self-critical training fine-tunes one model: {fix}")
        _check_same_model(config, config_to_dict(bundle.model.config), config_to_dict(bundle.text), source)
        return InitialModel(source, bundle.vocab, bundle.model.get_weights(), bundle.model.feature_dim)
    checkpoint = find_latest_checkpoint(source) if Path(source).exists() else None
    if checkpoint is None:
        raise ConfigError(f"scst.init_from: {source} is neither a bundle (bundle.json) nor a directory holding "
                          f"an imgcap checkpoint ({CHECKPOINT_META}); {fix}")
    meta = read_checkpoint_meta(checkpoint)
    _check_same_model(config, meta["job"]["model"], meta["job"]["text"], checkpoint)
    vocab = Vocabulary.load(Path(checkpoint) / VOCAB_FILE)
    model = CaptionModel(config.model, len(vocab), int(meta["feature_dim"]))
    return InitialModel(checkpoint, vocab, checkpoint_best_weights(checkpoint, model), int(meta["feature_dim"]))


def start_model(config: TrainJobConfig, data: TrainingData, start: InitialModel | None) -> CaptionModel:
    """The model a job trains: fresh, or with the weights of ``scst.init_from``."""
    if start is not None and start.feature_dim != data.features.dim:
        raise ConfigError(f"scst.init_from ({start.source}) was trained on {start.feature_dim}-d features but "
                          f"data.features has {data.features.dim}-d ones; use the features of the same backbone")
    model = build_model(config.model, data.vocab, data.features.dim, config.train.seed)
    if start is not None:
        model.set_weights(start.weights)
    return model


def training_provenance(config: TrainJobConfig, state: TrainingState, init_from: str | None) -> dict[str, Any]:
    """What a bundle records of its training: the job config, the phases, the best epoch of the last, the
    history, and what self-critical training started from (``scst.init_from``)."""
    return {"train_job": config_to_dict(config), "phases": [p.name for p in training_phases(config)],
            "phase": state.phase, "best_epoch": state.best_epoch, "history": [h.as_dict() for h in state.history],
            "init_from": init_from}


@dataclass
class TrainResult:
    """What `train_captioner` produced: the saved bundle, per-epoch history and the dev evaluation."""

    bundle_dir: Path
    history: list[EpochMetrics]
    best_epoch: int  # in the last phase
    report: EvaluationReport

    def format(self) -> str:
        best = best_of(self.history, self.best_epoch)
        lines = [f"bundle -> {self.bundle_dir}", f"  {len(self.history)} epoch(s)"]
        if best is not None:
            lines.append(f"  {describe_best(best)}; {best.images_per_second:.0f} images/s")
        return "\n".join(lines + ["  " + self.report.summary()])


def evaluate_bundle_on_dev(bundle: CaptionBundle, data: TrainingData, coco: bool) -> EvaluationReport:
    """Caption the dev images with the bundle's decoding and score them against their references."""
    dev_features = data.features.select(data.dev_ids).features
    captions = bundle.caption(dev_features)
    return evaluate_captions(data.dev_references, dict(zip(data.dev_ids, captions)), split="dev",
                             text_mode=bundle.text.mode, decoding=bundle.decode.label, coco=coco)


def write_history(history: list[EpochMetrics], path: Path) -> None:
    """The per-epoch metrics as CSV (one row per epoch)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0].as_dict()) if history else ["epoch"])
        writer.writeheader()
        writer.writerows(h.as_dict() for h in history)


def train_captioner(config: TrainJobConfig, progress: bool | None = None) -> TrainResult:
    """Single-process training job: data -> vocabulary -> model -> phases (cross-entropy, self-critical) ->
    bundle -> dev report.

    Writes into ``config.output_dir``: ``bundle/`` (see `imgcap.bundle`), ``history.csv`` and
    ``dev_report.json``. The coco scorer is used when pycocoevalcap is installed.
    """
    start = initial_model(config)
    data = prepare_training_data(config.data, config.text, start.vocab if start else None)
    log.info("vocabulary: %d words (text mode %s, min count %d); %d train / %d dev images, %d / %d captions",
             len(data.vocab), config.text.mode, config.text.min_count, len(data.train_ids), len(data.dev_ids),
             len(data.train), len(data.dev))
    model = start_model(config, data, start)
    evaluator = dev_evaluator(config, data, model)
    phases = training_phases(config)
    state = TrainingState(phases[0].name)
    for phase in phases:
        state.begin(phase.name)
        trainer = CaptionTrainer(model, phase.config, dropout=phase.dropout)
        stream = np.random.default_rng(phase.config.seed)  # one stream over the phase's epochs
        images, captions = phase_sizes(phase, config, data)
        fit(trainer, evaluator, state, phase_batches(phase, config, data, model, rng_for_epoch=lambda _: stream),
            num_images=images, num_captions=captions, progress=progress)
    bundle_dir, report = write_training_outputs(config, model, data, state.history,
                                                training_provenance(config, state, start and start.source))
    return TrainResult(bundle_dir, state.history, state.best_epoch, report)


def training_embedding(config: TrainJobConfig, data: TrainingData) -> EmbeddingSpec | None:
    """How the training features were made: as extraction recorded it next to Parquet features, else (an
    .npz records nothing) `data.backbone` with the extraction defaults; None when neither says."""
    recorded = data.embedding
    if recorded is not None:
        if config.data.backbone and config.data.backbone != recorded.tag:
            log.warning("data.backbone = %r but %s were made with %r: the bundle records %r",
                        config.data.backbone, config.data.features, recorded.tag, recorded.tag)
        return recorded
    return EmbeddingSpec.from_tag(config.data.backbone) if config.data.backbone else None


def write_training_outputs(config: TrainJobConfig, model: CaptionModel, data: TrainingData,
                           history: list[EpochMetrics], provenance: dict) -> tuple[Path, EvaluationReport]:
    """What every training job leaves in ``config.output_dir``: the bundle, history.csv, dev_report.json."""
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    bundle = CaptionBundle(model, data.vocab, config.text, config.decode, training_embedding(config, data),
                           provenance)
    bundle_dir = bundle.save(output / "bundle")
    write_history(history, output / "history.csv")
    report = evaluate_bundle_on_dev(bundle, data, coco=coco_available())
    (output / "dev_report.json").write_text(json.dumps(report.as_dict(), indent=2), encoding="utf-8")
    return bundle_dir, report
