"""The caption decoder (imgcap/model/decoder.py): the merge and inject models, their ensembles, GloVe
initialisation of the word embedding."""

import numpy as np
import pytest
import tensorflow as tf

from imgcap.config.model import ModelConfig
from imgcap.data.text import PAD_ID, START_ID, Vocabulary
from imgcap.model.decoder import CaptionEnsemble, CaptionModel, build_model


def test_merge_and_inject_have_the_documented_structure():
    vocab_size, dim = 12, 7
    merge = CaptionModel(ModelConfig(units=16, embedding_dim=8), vocab_size, dim)
    inject = CaptionModel(ModelConfig(architecture="inject", units=16, embedding_dim=8), vocab_size, dim)
    features = tf.random.normal((2, dim))
    # merge: the image is not in the LSTM state; inject: it is the LSTM's initial state.
    _, (h, c) = merge.initial_state(features)
    assert float(tf.reduce_sum(tf.abs(h))) == 0.0 and float(tf.reduce_sum(tf.abs(c))) == 0.0
    _, (h, _) = inject.initial_state(features)
    assert float(tf.reduce_sum(tf.abs(h))) > 0.0
    assert merge((features, tf.ones((2, 5), tf.int32))).shape == (2, 5, vocab_size)


def test_the_classifier_of_the_hidden_states_is_the_model_output(toy):
    """What the sampled-softmax loss trains on (`hidden_states`, then `classifier`) is the model's output."""
    model = build_model(ModelConfig(embedding_dim=32, units=64, dropout=0.1), toy.vocab, toy.table.dim, seed=0)
    inputs = (toy.dev_features[:4], tf.fill((4, 3), START_ID))
    np.testing.assert_allclose(model.classifier(model.hidden_states(inputs)), model(inputs))


def test_ensemble_averages_the_members_log_probabilities(trained_toy, toy):
    model, vocab = trained_toy.model, trained_toy.vocab
    other = build_model(ModelConfig(embedding_dim=8, units=16), vocab, model.feature_dim, seed=3)
    ensemble = CaptionEnsemble([model, other])
    image, state = ensemble.initial_state(tf.constant(toy.dev_features[:2]))
    log_probs, _ = ensemble.step(tf.constant([START_ID, START_ID]), image, state)
    features = toy.dev_features[:2]
    expected = (tf.nn.log_softmax(model.step(tf.constant([START_ID] * 2), *model.initial_state(features))[0])
                + tf.nn.log_softmax(other.step(tf.constant([START_ID] * 2), *other.initial_state(features))[0])) / 2
    np.testing.assert_allclose(log_probs.numpy(), expected.numpy(), atol=1e-5)


def test_glove_initialises_known_words(tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("dog 1 2 3 4\ncat -1 -2 -3 -4\n", encoding="utf-8")
    vocab = Vocabulary.build([["dog", "cat", "zebra"]], 1)
    model = build_model(ModelConfig(embedding_dim=4, units=8, glove_path=str(glove), glove_trainable=False),
                        vocab, feature_dim=3)
    table = model.embedding.embeddings.numpy()
    np.testing.assert_array_equal(table[vocab.id("dog")], [1, 2, 3, 4])
    np.testing.assert_array_equal(table[PAD_ID], 0)
    assert not model.embedding.trainable
    with pytest.raises(ValueError, match="4-d vectors but model.embedding_dim is 8"):
        build_model(ModelConfig(embedding_dim=8, units=8, glove_path=str(glove)), vocab, feature_dim=3)
