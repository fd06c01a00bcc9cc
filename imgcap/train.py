"""Training the caption decoder: a custom TensorFlow loop that runs alone or under tf.distribute.

Teacher forcing over whole captions with sparse cross-entropy that ignores `<pad>` (optionally label-smoothed,
or a sampled softmax for large vocabularies), gradient clipping, Adam with a per-epoch decay, an optional
moving average of the weights, and model selection on the dev split (dev loss or dev BLEU-4 of greedy
captions) with early stopping.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from imgcap.beam import GreedyDecoder
from imgcap.bundle import CaptionBundle
from imgcap.config import ModelConfig, TrainConfig, TrainJobConfig, config_to_dict
from imgcap.dataset import CaptionExamples, TrainingData, iterate_batches, prepare_training_data
from imgcap.embedding import EmbeddingSpec
from imgcap.evaluate import EvaluationReport, coco_available, evaluate_captions, nltk_corpus_bleu
from imgcap.glove import glove_embedding_matrix
from imgcap.model import CaptionModel
from imgcap.text import PAD_ID, Vocabulary

log = logging.getLogger(__name__)


@dataclass
class EpochMetrics:
    """What one epoch did; reported to the console, to Ray Train and into the bundle's provenance."""

    epoch: int
    train_loss: float
    dev_loss: float
    dev_bleu4: float | None
    learning_rate: float
    seconds: float
    images_per_second: float
    captions_per_second: float

    def as_dict(self) -> dict:
        return asdict(self)


def masked_token_loss(logits: tf.Tensor, targets: tf.Tensor, label_smoothing: float = 0.0) -> tuple[tf.Tensor, tf.Tensor]:
    """(sum of per-token losses, number of tokens) over non-`<pad>` targets.

    With label smoothing e, each token's loss is (1 - e) * NLL + e * mean over the vocabulary of -log p.
    """
    log_probs = tf.nn.log_softmax(logits)
    nll = -tf.gather(log_probs, targets, batch_dims=2)
    if label_smoothing > 0:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * tf.reduce_mean(log_probs, axis=-1)
    mask = tf.cast(tf.not_equal(targets, PAD_ID), nll.dtype)
    return tf.reduce_sum(nll * mask), tf.reduce_sum(mask)


def sampled_token_loss(hidden: tf.Tensor, targets: tf.Tensor, classifier: keras.layers.Dense,
                       num_sampled: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(sum of per-token losses, number of tokens) of a sampled softmax over non-`<pad>` targets.

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
    return tf.reduce_sum(losses), tf.reduce_sum(tf.cast(mask, losses.dtype))


def check_sampled_softmax(config: TrainConfig, vocab_size: int) -> None:
    """Raise ValueError unless ``train.sampled_softmax`` is off or smaller than the vocabulary."""
    if config.sampled_softmax >= vocab_size:
        raise ValueError(f"train.sampled_softmax = {config.sampled_softmax} must be smaller than the vocabulary "
                         f"({vocab_size} words); lower it or use 0 (the full softmax)")


class CaptionTrainer:
    """Fits a `CaptionModel` on caption examples; one instance per training run.

    Create it (and so the model and optimizer) inside ``strategy.scope()`` when a strategy is used.
    """

    def __init__(self, model: CaptionModel, config: TrainConfig,
                 strategy: tf.distribute.Strategy | None = None) -> None:
        self.model, self.config = model, config
        check_sampled_softmax(config, model.vocab_size)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate, use_ema=config.weight_ema > 0,
                                               ema_momentum=config.weight_ema or 0.99)
        self.optimizer.build(model.trainable_variables)
        spec = [tf.TensorSpec([None, model.feature_dim], tf.float32),
                tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None], tf.int32)]
        self._train_step = tf.function(self._distributed_step, input_signature=spec)
        self._eval_step = tf.function(self._eval_loss, input_signature=spec)

    def _replica_step(self, features: tf.Tensor, inputs: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            if self.config.sampled_softmax:
                hidden = self.model.hidden_states((features, inputs), training=True)
                total, count = sampled_token_loss(hidden, targets, self.model.classifier, self.config.sampled_softmax)
            else:
                logits = self.model((features, inputs), training=True)
                total, count = masked_token_loss(logits, targets, self.config.label_smoothing)
            loss = total / tf.maximum(count, 1.0)
            scaled = loss / self.strategy.num_replicas_in_sync
        variables = self.model.trainable_variables
        # The gradients here are of loss / replicas: clipping them at clip_norm / replicas clips each replica's
        # gradient at clip_norm, the same scale as one process (identical when there is one replica).
        gradients, _ = tf.clip_by_global_norm(tape.gradient(scaled, variables),
                                              self.config.clip_norm / self.strategy.num_replicas_in_sync)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return loss

    def _distributed_step(self, features: tf.Tensor, inputs: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        losses = self.strategy.run(self._replica_step, args=(features, inputs, targets))
        return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)

    def _eval_loss(self, features: tf.Tensor, inputs: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return masked_token_loss(self.model((features, inputs), training=False), targets)

    @contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """Inside the block the model holds the weights to evaluate and keep: the moving average of the weights
        when ``train.weight_ema`` > 0 (the trained weights come back on exit), else the weights as trained."""
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

    def evaluated_weights(self) -> list[np.ndarray]:
        """The model's weights as `evaluation_weights` sets them: what a best-epoch snapshot keeps."""
        with self.evaluation_weights():
            return self.model.get_weights()

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate.numpy())

    def set_learning_rate(self, value: float) -> None:
        self.optimizer.learning_rate.assign(value)

    def train_epoch(self, examples: CaptionExamples, features: np.ndarray, rng: np.random.Generator,
                    batch_size: int, num_batches: int | None = None, progress: bool = False,
                    on_step: Callable[[int, int], None] | None = None) -> float:
        """One pass over `examples` in length-bucketed batches; returns the mean training loss.

        `on_step(step, total_steps)` runs before each step (a test hook: fault injection mid-epoch).
        """
        total_batches = num_batches or math.ceil(len(examples) / batch_size)
        bar = keras.utils.Progbar(total_batches, stateful_metrics=["loss"], verbose=1) if progress else None
        losses = []
        for k, batch in enumerate(iterate_batches(examples, features, batch_size, rng, num_batches)):
            if on_step is not None:
                on_step(k, total_batches)
            losses.append(float(self._train_step(batch.features, batch.inputs, batch.targets)))
            if bar is not None:
                bar.update(k + 1, [("loss", float(np.mean(losses[-50:])))])
        return float(np.mean(losses))

    def evaluate_loss(self, examples: CaptionExamples, features: np.ndarray, batch_size: int = 512) -> float:
        """Mean per-token cross-entropy (no smoothing, no dropout) over `examples`."""
        total = count = 0.0
        for batch in iterate_batches(examples, features, batch_size):
            s, n = self._eval_step(batch.features, batch.inputs, batch.targets)
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    def save_state(self, path: str | Path) -> None:
        """Model weights and optimizer variables (step count, Adam moments) into one ``.npz`` (checkpoints)."""
        arrays = {f"model_{k}": w for k, w in enumerate(self.model.get_weights())}
        arrays.update({f"optimizer_{k}": np.asarray(v.numpy()) for k, v in enumerate(self.optimizer.variables)})
        np.savez(path, **arrays)

    def load_state(self, path: str | Path) -> None:
        """Restore what `save_state` wrote; shapes must match (same model config and vocabulary)."""
        with np.load(path) as state:
            self.model.set_weights([state[f"model_{k}"] for k in range(len(self.model.get_weights()))])
            for k, variable in enumerate(self.optimizer.variables):
                variable.assign(state[f"optimizer_{k}"])


def greedy_bleu4(model: CaptionModel, vocab: Vocabulary, features: np.ndarray,
                 references: list[list[list[str]]], max_length: int = 30) -> float:
    """NLTK corpus BLEU-4 of greedy captions for `features` against `references` (fast model selection)."""
    decoded = GreedyDecoder(model, max_length, batch_size=512).decode(features)
    return nltk_corpus_bleu(references, [vocab.decode(t) for t in decoded.tokens])[3]


EpochCallback = Callable[[EpochMetrics, CaptionTrainer], None]


def selection_score(metrics: EpochMetrics, select_by: str) -> float:
    """Higher is better: dev BLEU-4 (``train.select_by = "bleu"``) or minus the dev loss (``"loss"``)."""
    return metrics.dev_bleu4 if select_by == "bleu" else -metrics.dev_loss


def run_epoch(trainer: CaptionTrainer, vocab: Vocabulary, train: CaptionExamples, dev: CaptionExamples,
              features: np.ndarray, dev_features: np.ndarray, dev_references: list[list[list[str]]],
              epoch: int, rng: np.random.Generator, *, num_images: int, num_captions: int | None = None,
              batch_size: int | None = None, num_batches: int | None = None, progress: bool = False,
              on_step: Callable[[int, int], None] | None = None) -> EpochMetrics:
    """Epoch `epoch` (0-based) of training plus the dev evaluation: learning rate for the epoch, one pass over
    `train`, dev loss and (when selecting by BLEU) greedy dev BLEU-4.

    Shared by `fit` and the Ray Train loop (imgcap.distributed), where `train` is the worker's shard,
    `batch_size` the per-worker batch, `num_batches` the steps every worker takes, and `num_images` /
    `num_captions` count the whole (global) training set, so images/s is the job's throughput.
    """
    config = trainer.config
    trainer.set_learning_rate(config.learning_rate * config.lr_decay ** epoch)
    started = time.perf_counter()
    train_loss = trainer.train_epoch(train, features, rng, batch_size or config.batch_size, num_batches,
                                     progress=progress, on_step=on_step)
    seconds = time.perf_counter() - started
    with trainer.evaluation_weights():
        dev_loss = trainer.evaluate_loss(dev, features)
        bleu = greedy_bleu4(trainer.model, vocab, dev_features, dev_references) if config.select_by == "bleu" else None
    metrics = EpochMetrics(epoch + 1, train_loss, dev_loss, bleu, trainer.learning_rate, seconds,
                           num_images / seconds, (num_captions or len(train)) / seconds)
    log.info("epoch %d/%d: train loss %.4f, dev loss %.4f%s, %.1f s, %.0f images/s", epoch + 1,
             config.epochs, train_loss, dev_loss, "" if bleu is None else f", dev BLEU-4 {bleu:.4f}",
             seconds, metrics.images_per_second)
    return metrics


@dataclass
class FitResult:
    history: list[EpochMetrics]
    best_epoch: int
    best_score: float


def fit(
    trainer: CaptionTrainer,
    vocab: Vocabulary,
    train: CaptionExamples,
    dev: CaptionExamples,
    features: np.ndarray,
    dev_features: np.ndarray,
    dev_references: list[list[list[str]]],
    *,
    start_epoch: int = 0,
    num_images: int | None = None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool | None = None,
) -> FitResult:
    """Train for `trainer.config.epochs` epochs, keeping the weights of the best dev epoch.

    The best epoch is the one with the highest greedy dev BLEU-4 (``train.select_by = "bleu"``) or the
    lowest dev loss (``"loss"``). Training stops after ``train.patience`` epochs without improvement; the
    model ends with the best epoch's weights.
    """
    config = trainer.config
    select_by = config.select_by
    progress = sys.stderr.isatty() if progress is None else progress
    rng = np.random.default_rng(config.seed + start_epoch)
    num_images = num_images or len(np.unique(train.image_rows))
    history: list[EpochMetrics] = []
    best_score, best_epoch, best_weights = -math.inf, start_epoch, None
    for epoch in range(start_epoch, config.epochs):
        metrics = run_epoch(trainer, vocab, train, dev, features, dev_features, dev_references, epoch, rng,
                            num_images=num_images, progress=progress)
        history.append(metrics)
        score = selection_score(metrics, select_by)
        if score > best_score:
            best_score, best_epoch, best_weights = score, epoch + 1, trainer.evaluated_weights()
        if on_epoch_end is not None:
            on_epoch_end(metrics, trainer)
        if config.patience and epoch + 1 - best_epoch >= config.patience:
            log.info("early stop: no better dev %s for %d epochs", select_by, config.patience)
            break
    if best_weights is not None:
        trainer.model.set_weights(best_weights)
    return FitResult(history, best_epoch, best_score)


def build_model(config: ModelConfig, vocab: Vocabulary, feature_dim: int, seed: int = 0) -> CaptionModel:
    """A fresh `CaptionModel`, its embedding initialised from GloVe when `config.glove_path` is set."""
    keras.utils.set_random_seed(seed)
    matrix = None
    if config.glove_path:
        matrix, covered = glove_embedding_matrix(config.glove_path, vocab, config.embedding_dim, seed)
        log.info("GloVe covers %d of %d vocabulary words", covered, len(vocab))
    return CaptionModel(config, len(vocab), feature_dim, embedding_matrix=matrix)


@dataclass
class TrainResult:
    """What `train_captioner` produced: the saved bundle, per-epoch history and the dev evaluation."""

    bundle_dir: Path
    history: list[EpochMetrics]
    best_epoch: int
    report: EvaluationReport

    def format(self) -> str:
        best = self.history[self.best_epoch - 1] if self.history else None
        lines = [f"bundle -> {self.bundle_dir}", f"  {len(self.history)} epoch(s), best epoch {self.best_epoch}"]
        if best is not None:
            lines.append(f"  best epoch: dev loss {best.dev_loss:.4f}, {best.images_per_second:.0f} images/s")
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
    """Single-process training job: data -> vocabulary -> model -> fit -> bundle -> dev report.

    Writes into ``config.output_dir``: ``bundle/`` (see `imgcap.bundle`), ``history.csv`` and
    ``dev_report.json``. The coco scorer is used when pycocoevalcap is installed.
    """
    data = prepare_training_data(config.data, config.text)
    log.info("vocabulary: %d words (text mode %s, min count %d); %d train / %d dev images, %d / %d captions",
             len(data.vocab), config.text.mode, config.text.min_count, len(data.train_ids), len(data.dev_ids),
             len(data.train), len(data.dev))
    model = build_model(config.model, data.vocab, data.features.dim, config.train.seed)
    trainer = CaptionTrainer(model, config.train)
    dev_features = data.features.select(data.dev_ids).features
    dev_references = [data.dev_references[i] for i in data.dev_ids]
    result = fit(trainer, data.vocab, data.train, data.dev, data.features.features, dev_features,
                 dev_references, progress=progress)
    provenance = {"train_job": config_to_dict(config), "best_epoch": result.best_epoch,
                  "history": [h.as_dict() for h in result.history]}
    bundle_dir, report = write_training_outputs(config, model, data, result.history, provenance)
    return TrainResult(bundle_dir, result.history, result.best_epoch, report)


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
