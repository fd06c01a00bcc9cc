"""Training examples (imgcap/data/dataset.py): caption batches bucketed by length."""

import numpy as np

from imgcap.data.dataset import iterate_batches
from imgcap.data.text import PAD_ID, START_ID


def test_bucketed_batches_cover_every_caption_once_with_little_padding(toy):
    seen = []
    for batch in iterate_batches(toy.train, toy.table.features, 16, np.random.default_rng(0)):
        assert batch.inputs.shape == batch.targets.shape and batch.features.shape[0] == batch.inputs.shape[0]
        assert (batch.inputs[:, 0] == START_ID).all()
        # Bucketing: the longest caption of the batch has no padding at all.
        assert (batch.targets[:, -1] != PAD_ID).any()
        seen.append(batch.inputs.shape[0])
    assert sum(seen) == len(toy.train)
