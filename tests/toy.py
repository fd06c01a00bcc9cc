"""A small, learnable captioning problem for fast tests: feature vectors that encode caption words.

Each toy image has a colour and an object; its feature vector is the one-hot code of both plus noise, and its
captions name them in several phrasings. A decoder that learns anything beats chance on it within seconds.
"""

from __future__ import annotations

import numpy as np

from imgcap.captions import CaptionCorpus
from imgcap.feature_table import FeatureTable

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
OBJECTS = ["dog", "cat", "car", "ball", "bird"]
TEMPLATES = ["a {c} {o}", "a {c} {o} is here", "there is a {c} {o}", "the {o} is {c}", "one {c} {o} outside"]


def make_toy_corpus(num_images: int = 300, seed: int = 0, noise: float = 0.3) -> tuple[CaptionCorpus, FeatureTable]:
    """Captions and matching features for `num_images` toy images (ids toy_00000 ...)."""
    rng = np.random.default_rng(seed)
    dim = len(COLOURS) + len(OBJECTS) + 5
    ids, rows, captions = [], [], {}
    for n in range(num_images):
        c, o = rng.integers(len(COLOURS)), rng.integers(len(OBJECTS))
        vector = rng.normal(0.0, noise, dim).astype(np.float32)
        vector[c] += 1.0
        vector[len(COLOURS) + o] += 1.0
        image_id = f"toy_{n:05d}"
        ids.append(image_id)
        rows.append(vector)
        captions[image_id] = [t.format(c=COLOURS[c], o=OBJECTS[o]) for t in TEMPLATES]
    return CaptionCorpus(captions), FeatureTable(ids, np.stack(rows), [f"toy://{i}" for i in ids])
