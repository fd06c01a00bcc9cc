"""GloVe initialisation of the word embedding.

Words the GloVe file lacks (and the reserved tokens ``<unk>``, ``<start>``, ``<end>``) are drawn from a normal
distribution with the per-dimension mean and standard deviation of the GloVe vectors that were found, so
they sit at the same scale as the pretrained rows; ``<pad>`` is all zeros. The draw is seeded, so the same
vocabulary and file always give the same matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgcap.data.text import PAD_ID, Vocabulary


def read_glove(path: str | Path, words: set[str] | None = None) -> dict[str, np.ndarray]:
    """Vectors of a GloVe text file (``word v1 .. vd`` per line), only for `words` if given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GloVe file not found: {path}")
    vectors: dict[str, np.ndarray] = {}
    dim = None
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            word, _, rest = line.rstrip("\n").partition(" ")
            if not rest:
                continue
            if words is not None and word not in words:
                continue
            vector = np.array(rest.split(" "), dtype=np.float32)
            if dim is None:
                dim = len(vector)
            elif len(vector) != dim:
                raise ValueError(f"{path}:{number}: vector of {len(vector)} values, expected {dim}")
            vectors[word] = vector
    return vectors


def glove_embedding_matrix(path: str | Path, vocab: Vocabulary, dim: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """A [len(vocab), dim] embedding matrix from GloVe and how many vocabulary words GloVe covered."""
    vectors = read_glove(path, set(vocab.words))
    if not vectors:
        raise ValueError(f"{path}: none of the {len(vocab)} vocabulary words has a GloVe vector")
    found_dim = len(next(iter(vectors.values())))
    if found_dim != dim:
        raise ValueError(f"{path} has {found_dim}-d vectors but model.embedding_dim is {dim}: make them equal")
    known = np.stack(list(vectors.values()))
    rng = np.random.default_rng(seed)
    matrix = rng.normal(known.mean(axis=0), known.std(axis=0), size=(len(vocab), dim)).astype(np.float32)
    matrix[PAD_ID] = 0.0
    for i, word in enumerate(vocab.words):
        if word in vectors:
            matrix[i] = vectors[word]
    return matrix, sum(w in vectors for w in vocab.words)
