"""Dev evaluation during and after training: dev loss, greedy BLEU-4 and CIDEr-D, the bundle's dev report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from imgcap.config.training import TrainJobConfig
from imgcap.data.dataset import CaptionExamples, TrainingData, iterate_batches
from imgcap.data.text import Vocabulary
from imgcap.metrics.cider import CiderD
from imgcap.metrics.evaluate import (
    EvaluationReport,
    evaluate_captions,
    nltk_corpus_bleu,
)
from imgcap.model.beam import GreedyDecoder
from imgcap.model.bundle import CaptionBundle
from imgcap.model.decoder import Decoder
from imgcap.train.losses import masked_token_loss


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

    def __init__(self, model: Decoder, vocab: Vocabulary, examples: CaptionExamples, features: np.ndarray,
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


def dev_evaluator(config: TrainJobConfig, data: TrainingData, model: Decoder) -> DevEvaluator:
    """The `DevEvaluator` of a job's model on its dev split (greedy captions up to ``decode.max_length``)."""
    return DevEvaluator(model, data.vocab, data.dev, data.features.features,
                        data.features.select(data.dev_ids).features,
                        [data.dev_references[i] for i in data.dev_ids], config.decode.max_length)


def evaluate_bundle_on_dev(bundle: CaptionBundle, data: TrainingData, coco: bool) -> EvaluationReport:
    """Caption the dev images with the bundle's decoding and score them against their references."""
    dev_features = data.features.select(data.dev_ids).features
    captions = bundle.caption(dev_features)
    return evaluate_captions(data.dev_references, dict(zip(data.dev_ids, captions)), split="dev",
                             text_mode=bundle.text.mode, decoding=bundle.decode.label, coco=coco)
