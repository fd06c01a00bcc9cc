"""The soft-attention caption decoder (Xu et al. 2015, "Show, Attend and Tell", the deterministic variant).

The image is a grid of R region features (a CNN's last convolution, `pooling = "none"`: 9x9 for
EfficientNet-Lite2 at 260 px), not one vector. At every step the LSTM's previous state scores each region
(additive attention), the softmax of the scores weights the regions into a context vector, a gate computed
from the state scales it ("selector" beta), and the LSTM reads the previous word with that context. The next
word is predicted by the deep output layer from the word, the new state and the context. The LSTM state starts
from the mean region feature. Training adds the doubly stochastic penalty, lambda * mean over regions of
(1 - sum over the caption's steps of the region's attention)^2, which asks the decoder to look at every region
over a caption.

It has the decoding interface of `imgcap.model.decoder.CaptionModel`: the regions are projected once per image
(`initial_state`: the per-image part, never re-encoded), and `step` attends to them for one token. Randomness
(dropout) stays outside the teacher-forced time loop, which is one `tf.while_loop` over the steps.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from imgcap.config.model import ModelConfig
from imgcap.data.text import PAD_ID
from imgcap.model.words import word_embedding

AttentionImage = tuple[tf.Tensor, tf.Tensor]  # (region values [B, R, A], region keys [B, R, A])
AttentionState = tuple[tf.Tensor, tf.Tensor]  # (LSTM h, LSTM c)


class AttentionCaptionModel(keras.Model):
    """Soft-attention caption decoder over `regions` region features of `feature_dim / regions` channels
    each (flattened row-major, as extraction stores a grid); outputs next-word logits."""

    def __init__(self, config: ModelConfig, vocab_size: int, feature_dim: int, regions: int,
                 embedding_matrix: np.ndarray | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if regions < 2 or feature_dim % regions:
            raise ValueError(f"model.architecture = \"attention\" needs grid features (R regions x C channels); "
                             f"got {feature_dim}-d features over {regions} region(s): extract with pooling = \"none\"")
        self.config, self.vocab_size, self.feature_dim, self.regions = config, vocab_size, feature_dim, regions
        self.channels = feature_dim // regions
        units = config.units
        self.embedding = word_embedding(config, vocab_size, embedding_matrix)
        self.embedding_dropout = layers.Dropout(config.embedding_dropout)
        self.image_dropout = layers.Dropout(config.dropout)
        # The regions are projected once per image to `attention_dim` channels: the values the context mixes and
        # the LSTM reads. This projection is most of the decoder's cost per caption (R x C x attention_dim).
        self.region_projection = layers.Dense(config.attention_dim, activation="relu", name="region_projection")
        self.region_keys = layers.Dense(config.attention_dim, name="region_keys")
        self.state_query = layers.Dense(config.attention_dim, use_bias=False, name="state_query")
        self.attention_score = layers.Dense(1, name="attention_score")
        self.gate = layers.Dense(1, activation="sigmoid", name="context_gate")
        self.init_h = layers.Dense(units, activation="tanh", name="init_h")
        self.init_c = layers.Dense(units, activation="tanh", name="init_c")
        self.cell = layers.LSTMCell(units, name="lstm")
        # Deep output (Xu et al. eq. 7): word embedding + projections of the state and the context.
        self.state_output = layers.Dense(config.embedding_dim, name="state_output")
        self.context_output = layers.Dense(config.embedding_dim, name="context_output")
        self.output_dropout = layers.Dropout(config.dropout)
        self.classifier = layers.Dense(vocab_size, name="classifier")
        # Build every weight now so a fresh model and a loaded bundle have identical variables.
        self((tf.zeros((1, feature_dim)), tf.zeros((1, 1), tf.int32)))

    def _image(self, features: tf.Tensor, training: bool) -> AttentionImage:
        grid = tf.reshape(features, [-1, self.regions, self.channels])
        values = self.region_projection(self.image_dropout(grid, training=training))
        return values, self.region_keys(values)

    def _initial_lstm_state(self, values: tf.Tensor) -> AttentionState:
        mean = tf.reduce_mean(values, axis=1)
        return self.init_h(mean), self.init_c(mean)

    def _attend(self, image: AttentionImage, h: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(gated context [B, A], attention weights [B, R]) for the state `h`."""
        values, keys = image
        scores = self.attention_score(tf.tanh(keys + self.state_query(h)[:, None, :]))[..., 0]
        alpha = tf.nn.softmax(scores, axis=-1)
        context = tf.reduce_sum(alpha[..., None] * values, axis=1)
        return self.gate(h) * context, alpha

    def _lstm_step(self, embedded: tf.Tensor, image: AttentionImage,
                   state: AttentionState) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, AttentionState]:
        """One step: (new h, context, alpha, new state) from the previous word's embedding and the state."""
        h, c = state
        context, alpha = self._attend(image, h)
        out, (h, c) = self.cell(tf.concat([embedded, context], axis=-1), [h, c], training=False)
        return out, context, alpha, (h, c)

    def _deep_output(self, embedded: tf.Tensor, out: tf.Tensor, context: tf.Tensor, training: bool) -> tf.Tensor:
        hidden = tf.tanh(embedded + self.state_output(out) + self.context_output(context))
        return self.output_dropout(hidden, training=training)

    def forward(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """Teacher forcing up to the classifier: (features [B, D], tokens [B, T]) -> (hidden [B, T, E], the
        doubly stochastic penalty, a scalar to add to the loss)."""
        features, tokens = inputs
        image = self._image(features, training)
        state = self._initial_lstm_state(image[0])
        embedded = self.embedding_dropout(self.embedding(tokens), training=training)
        steps = tf.shape(tokens)[1]
        outs = tf.TensorArray(embedded.dtype, size=steps)
        contexts = tf.TensorArray(embedded.dtype, size=steps)
        alphas = tf.TensorArray(embedded.dtype, size=steps)

        def body(t, state, outs, contexts, alphas):
            out, context, alpha, state = self._lstm_step(embedded[:, t], image, state)
            return t + 1, state, outs.write(t, out), contexts.write(t, context), alphas.write(t, alpha)

        _, _, outs, contexts, alphas = tf.while_loop(lambda t, *_: t < steps, body,
                                                     (tf.constant(0), state, outs, contexts, alphas))
        out = tf.transpose(outs.stack(), [1, 0, 2])
        context = tf.transpose(contexts.stack(), [1, 0, 2])
        hidden = self._deep_output(embedded, out, context, training)
        # Only a caption's own steps count: <pad> inputs after its end attend to nothing.
        mask = tf.cast(tf.not_equal(tokens, PAD_ID), embedded.dtype)
        attention_total = tf.einsum("tbr,bt->br", alphas.stack(), mask)
        penalty = self.config.attention_penalty * tf.reduce_mean(tf.square(1.0 - attention_total))
        return hidden, penalty

    def hidden_states(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Teacher forcing up to the classifier: [B, T, E] (see `forward`)."""
        return self.forward(inputs, training)[0]

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Teacher forcing: (features [B, D], tokens [B, T]) -> logits [B, T, V]."""
        return self.classifier(self.hidden_states(inputs, training))

    def initial_state(self, features: tf.Tensor) -> tuple[AttentionImage, AttentionState]:
        """The projected regions (the per-image part, attended to at every step) and the first LSTM state."""
        image = self._image(features, training=False)
        return image, self._initial_lstm_state(image[0])

    def step(self, tokens: tf.Tensor, image: AttentionImage,
             state: AttentionState) -> tuple[tf.Tensor, AttentionState]:
        """One decoding step: previous tokens [B] -> next-word logits [B, V] and the new state."""
        embedded = self.embedding(tokens)
        out, context, _, state = self._lstm_step(embedded, image, state)
        return self.classifier(self._deep_output(embedded, out, context, training=False)), state

    def attention(self, features: tf.Tensor, tokens: tf.Tensor) -> tf.Tensor:
        """The attention weights [B, T, R] of teacher-forced `tokens` (where the decoder looks at each word)."""
        image = self._image(features, training=False)
        state = self._initial_lstm_state(image[0])
        embedded = self.embedding(tokens)
        alphas = []
        for t in range(tokens.shape[1]):
            _, _, alpha, state = self._lstm_step(embedded[:, t], image, state)
            alphas.append(alpha)
        return tf.stack(alphas, axis=1)
