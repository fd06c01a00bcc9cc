"""What each phase trains on: teacher-forced caption batches (cross-entropy) or self-critical batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from imgcap.config.training import TrainJobConfig
from imgcap.data.dataset import Batch, CaptionExamples, TrainingData, iterate_batches
from imgcap.metrics.cider import CiderD
from imgcap.model.decoder import Decoder
from imgcap.train.scst import SelfCriticalBatches
from imgcap.train.state import Phase


class BatchSource(Protocol):
    """Where a phase's batches come from, epoch by epoch (`CaptionBatches`, `imgcap.train.scst.SelfCriticalBatches`)."""

    def epoch(self, epoch: int) -> tuple[Iterator[Batch], int]: ...

    def epoch_reward(self) -> float | None: ...


class CaptionBatches:
    """Cross-entropy batches: reference captions, length-bucketed (`imgcap.data.dataset.iterate_batches`)."""

    def __init__(self, examples: CaptionExamples, features: np.ndarray, batch_size: int,
                 rng_for_epoch: Callable[[int], np.random.Generator], num_batches: int | None = None) -> None:
        self.examples, self.features, self.batch_size = examples, features, batch_size
        self.num_batches, self._rng_for_epoch = num_batches, rng_for_epoch

    def epoch(self, epoch: int) -> tuple[Iterator[Batch], int]:
        total = self.num_batches or math.ceil(len(self.examples) / self.batch_size)
        return iterate_batches(self.examples, self.features, self.batch_size, self._rng_for_epoch(epoch),
                               self.num_batches), total

    def epoch_reward(self) -> float | None:
        return None


def phase_batches(phase: Phase, job: TrainJobConfig, data: TrainingData, model: Decoder, *,
                  rank: int = 0, world_size: int = 1,
                  rng_for_epoch: Callable[[int], np.random.Generator] | None = None) -> BatchSource:
    """The batches of `phase` for data-parallel worker `rank` of `world_size` (every world_size-th caption
    or image), each worker taking the same number of steps; the batch size is the phase's global batch."""
    batch_size = phase.config.batch_size // world_size
    if rng_for_epoch is None:
        rng_for_epoch = lambda epoch: np.random.default_rng([phase.config.seed, epoch, rank])  # noqa: E731
    features = data.features.features
    if phase.name == "xe":
        num_batches = max(math.ceil(len(data.train.shard(r, world_size)) / batch_size) for r in range(world_size))
        return CaptionBatches(data.train.shard(rank, world_size), features, batch_size, rng_for_epoch,
                              num_batches if world_size > 1 else None)
    images = np.arange(len(data.train_ids))  # training image k: reward references k, features row rows[k]
    where = data.features.index()
    rows = np.array([where[i] for i in data.train_ids], dtype=np.int64)
    num_batches = max(math.ceil(len(images[r::world_size]) / batch_size) for r in range(world_size))
    reward = CiderD([data.train_references[i] for i in data.train_ids])
    return SelfCriticalBatches(model, data.vocab, reward, features, rows, images[rank::world_size], job.scst,
                               batch_size, rng_for_epoch, num_batches if world_size > 1 else None)


def phase_sizes(phase: Phase, job: TrainJobConfig, data: TrainingData) -> tuple[int, int]:
    """(images, captions) one epoch of `phase` trains on, over all workers."""
    images = len(data.train_ids)
    return images, len(data.train) if phase.name == "xe" else images * job.scst.samples
