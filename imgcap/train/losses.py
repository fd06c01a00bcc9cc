"""Training losses: masked cross-entropy over caption tokens and its sampled-softmax variant."""

from __future__ import annotations

import keras
import tensorflow as tf

from imgcap.config.training import TrainConfig
from imgcap.data.text import PAD_ID


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
