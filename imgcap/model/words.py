"""The word embedding every decoder starts from: trainable, or initialised from GloVe (and then frozen unless
``model.glove_trainable``)."""

from __future__ import annotations

import keras
import numpy as np

from imgcap.config.model import ModelConfig


def word_embedding(config: ModelConfig, vocab_size: int,
                   embedding_matrix: np.ndarray | None = None) -> keras.layers.Embedding:
    """The `embedding` layer of a decoder: `embedding_matrix` (e.g. GloVe rows) as its initial weights."""
    initializer = {} if embedding_matrix is None else {
        "embeddings_initializer": keras.initializers.Constant(embedding_matrix)}
    return keras.layers.Embedding(vocab_size, config.embedding_dim, name="embedding",
                                  trainable=config.glove_trainable or embedding_matrix is None, **initializer)
