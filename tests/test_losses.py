"""Training losses (imgcap/train/losses.py): the masked, optionally label-smoothed token cross-entropy."""

import pytest
import tensorflow as tf

from imgcap.train.losses import masked_token_loss


def test_label_smoothing_loss_is_larger_for_confident_correct_predictions():
    logits = tf.constant([[[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]]])
    targets = tf.constant([[1, 0]])  # second token is <pad>: ignored
    plain_sum, count = masked_token_loss(logits, targets)
    smooth_sum, _ = masked_token_loss(logits, targets, label_smoothing=0.1)
    assert float(count) == 1.0
    assert float(plain_sum) == pytest.approx(-float(tf.nn.log_softmax(logits)[0, 0, 1]), rel=1e-5)
    assert float(smooth_sum) < float(plain_sum)  # target 1 is wrong here; smoothing spreads the blame
