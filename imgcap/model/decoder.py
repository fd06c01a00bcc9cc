"""The caption decoder: an LSTM language model conditioned on an image feature vector (Keras 3).

Two ways to put the image in (Tanti et al., "Where to put the image in an image caption generator"):

- ``merge``: the LSTM reads words only; its output at each step is added to a projection of the image and a
  small MLP predicts the next word. The image never enters the recurrent state.
- ``inject`` (their "init"): the image projection is the LSTM's initial state; the LSTM output alone
  predicts the next word.

The same layers serve teacher-forced training over whole captions (`call`) and incremental decoding one token
at a time with the LSTM state carried between steps (`initial_state` + `step`), so decoding never re-runs a
prefix. The decoding interface, shared with the attention decoder (`imgcap.model.attention`) and ensembles:
`initial_state(features) -> (image, state)`, where `image` is what a step reads of the image (computed once,
the same for every hypothesis of an image) and `state` is carried and reordered by the search; and
`step(tokens, image, state) -> (logits, state)`.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from imgcap.config.model import ModelConfig
from imgcap.data.glove import glove_embedding_matrix
from imgcap.data.text import Vocabulary
from imgcap.model.attention import AttentionCaptionModel
from imgcap.model.words import word_embedding

log = logging.getLogger(__name__)

LstmState = tuple[tf.Tensor, tf.Tensor]  # (LSTM h, LSTM c)


class CaptionModel(keras.Model):
    """Merge or inject caption decoder; outputs next-word logits (not probabilities)."""

    regions = 1  # it reads one feature vector per image

    def __init__(self, config: ModelConfig, vocab_size: int, feature_dim: int,
                 embedding_matrix: np.ndarray | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config, self.vocab_size, self.feature_dim = config, vocab_size, feature_dim
        self.image_dropout = layers.Dropout(config.dropout)
        self.embedding = word_embedding(config, vocab_size, embedding_matrix)
        self.embedding_dropout = layers.Dropout(config.embedding_dropout)
        self.lstm = layers.LSTM(config.units, return_sequences=True, return_state=True, name="lstm")
        self.output_dropout = layers.Dropout(config.dropout)
        if config.architecture == "merge":
            self.image_projection = layers.Dense(config.units, activation="relu", name="image_projection")
            self.hidden = layers.Dense(config.units, activation="relu", name="merge_hidden")
        else:
            self.image_projection = layers.Dense(2 * config.units, activation="tanh", name="image_projection")
        self.classifier = layers.Dense(vocab_size, name="classifier")
        # Build every weight now so a fresh model and a loaded bundle have identical variables.
        self((tf.zeros((1, feature_dim)), tf.zeros((1, 1), tf.int32)))

    def _image_state(self, features: tf.Tensor, training: bool) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(image context [B, U] for merge, [B, 0] for inject; LSTM h; LSTM c) before the first word."""
        projected = self.image_projection(self.image_dropout(features, training=training))
        batch = tf.shape(features)[0]
        if self.config.architecture == "merge":
            zeros = tf.zeros((batch, self.config.units), dtype=projected.dtype)
            return projected, zeros, zeros
        h, c = tf.split(projected, 2, axis=-1)
        return tf.zeros((batch, 0), dtype=projected.dtype), h, c

    def _hidden(self, context: tf.Tensor, lstm_out: tf.Tensor, training: bool) -> tf.Tensor:
        x = self.output_dropout(lstm_out, training=training)
        if self.config.architecture == "merge":
            if lstm_out.shape.rank == 3:
                context = context[:, None, :]
            x = self.hidden(x + context)
        return x

    def _predict(self, context: tf.Tensor, lstm_out: tf.Tensor, training: bool) -> tf.Tensor:
        return self.classifier(self._hidden(context, lstm_out, training))

    def hidden_states(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Teacher forcing up to the classifier: (features [B, D], tokens [B, T]) -> [B, T, H].

        `call` is `classifier(hidden_states(...))`; a sampled-softmax loss (imgcap.train.losses) takes these and the
        classifier's weights instead of the logits over the whole vocabulary.
        """
        features, tokens = inputs
        context, h, c = self._image_state(features, training)
        embedded = self.embedding_dropout(self.embedding(tokens), training=training)
        outputs, _, _ = self.lstm(embedded, initial_state=[h, c], training=training)
        return self._hidden(context, outputs, training)

    def forward(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """(`hidden_states`, a penalty to add to the loss): this decoder has none (the attention decoder's
        doubly stochastic regularisation goes there)."""
        return self.hidden_states(inputs, training), tf.constant(0.0)

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Teacher forcing: (features [B, D], tokens [B, T]) -> logits [B, T, V]."""
        return self.classifier(self.hidden_states(inputs, training))

    def initial_state(self, features: tf.Tensor) -> tuple[tf.Tensor, LstmState]:
        """(image context, LSTM state) before the first token, for a batch of image features."""
        context, h, c = self._image_state(features, training=False)
        return context, (h, c)

    def step(self, tokens: tf.Tensor, image: tf.Tensor, state: LstmState) -> tuple[tf.Tensor, LstmState]:
        """One decoding step: previous tokens [B], the image context and the state -> next-word logits [B, V]
        and the new state."""
        out, (h, c) = self.lstm.cell(self.embedding(tokens), list(state), training=False)
        return self._predict(image, out, training=False), (h, c)


Decoder = CaptionModel | AttentionCaptionModel  # what a bundle member is


class CaptionEnsemble:
    """Several caption decoders over the same vocabulary and features, decoded as one.

    Each step averages the members' next-word log-probabilities (a product of experts: the ensemble likes a
    word only if every member does); the image part and the state are the tuples of the members'. It has the
    decoding interface of `CaptionModel`, so the greedy and beam decoders take it as they are; its members
    may mix architectures over the same features (merge, inject, attention).
    """

    def __init__(self, members: list[Decoder]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        shapes = {(m.vocab_size, m.feature_dim) for m in members}
        if len(shapes) != 1:
            raise ValueError(f"ensemble members disagree on (vocabulary size, feature dim): {sorted(shapes)}")
        self.members = list(members)
        self.vocab_size, self.feature_dim = members[0].vocab_size, members[0].feature_dim
        self.regions = max(m.regions for m in members)

    def initial_state(self, features: tf.Tensor) -> tuple[tuple, tuple]:
        starts = [m.initial_state(features) for m in self.members]
        return tuple(image for image, _ in starts), tuple(state for _, state in starts)

    def step(self, tokens: tf.Tensor, image: tuple, state: tuple) -> tuple[tf.Tensor, tuple]:
        outputs = [m.step(tokens, i, s) for m, i, s in zip(self.members, image, state)]
        log_probs = tf.add_n([tf.nn.log_softmax(logits) for logits, _ in outputs]) / len(outputs)
        return log_probs, tuple(s for _, s in outputs)


def create_decoder(config: ModelConfig, vocab_size: int, feature_dim: int, regions: int = 1,
                   embedding_matrix: np.ndarray | None = None) -> Decoder:
    """The decoder `config.architecture` names, its weights built: merge / inject over feature vectors, or
    attention over `regions` region features (`feature_dim` = regions x channels)."""
    if config.architecture == "attention":
        return AttentionCaptionModel(config, vocab_size, feature_dim, regions, embedding_matrix)
    return CaptionModel(config, vocab_size, feature_dim, embedding_matrix)


def build_model(config: ModelConfig, vocab: Vocabulary, feature_dim: int, seed: int = 0, regions: int = 1) -> Decoder:
    """A fresh decoder (`create_decoder`), its embedding initialised from GloVe when `config.glove_path` is set."""
    keras.utils.set_random_seed(seed)
    matrix = None
    if config.glove_path:
        matrix, covered = glove_embedding_matrix(config.glove_path, vocab, config.embedding_dim, seed)
        log.info("GloVe covers %d of %d vocabulary words", covered, len(vocab))
    return create_decoder(config, len(vocab), feature_dim, regions, matrix)
