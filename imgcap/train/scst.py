"""Self-critical sequence training (Rennie et al. 2017; the k-sample baseline of Luo 2020): the batches.

Cross-entropy training teaches the decoder to predict the next word of a reference caption given the true
previous words, then asks it to continue its own words at test time (exposure bias), and optimises
likelihood, not the caption metric. Self-critical training fine-tunes it on its own captions instead: for each
image of a batch it samples k captions (`imgcap.model.beam.CaptionSampler`, one compiled graph), rewards each with
CIDEr-D against that image's reference captions (`imgcap.metrics.cider.CiderD`, document frequencies over all
training references, computed once), and weights the caption's log-likelihood by its advantage, reward minus
a baseline. The baseline is the mean reward of the image's *other* k - 1 samples (Luo 2020: unbiased, and no
extra decoding) or the reward of the image's greedy caption (Rennie et al.). Minimising
``-sum(advantage * log p(caption)) / tokens`` is the REINFORCE policy gradient: captions better than the
baseline become likelier, worse ones less likely.

The update itself is the cross-entropy step with a weight per caption (`imgcap.train.trainer.CaptionTrainer`): a
`Batch` here holds the sampled captions as targets and their advantages as weights. Sampling runs without
dropout; the update's teacher-forced log-probabilities run with the model's dropout by default
(``scst.dropout``): the samples are then scored under dropout-perturbed copies of the policy, a regulariser
that measured better on dev than the exact gradient of the sampling policy (``scst.dropout = false``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from imgcap.config.training import ScstConfig
from imgcap.data.dataset import Batch
from imgcap.data.text import END_ID, PAD_ID, START_ID, Vocabulary
from imgcap.metrics.cider import CiderD
from imgcap.model.beam import CaptionSampler, GreedyDecoder
from imgcap.model.decoder import Decoder


class SelfCriticalBatches:
    """The batches of one worker's images for self-critical training, epoch by epoch.

    Training image k has the references k of `reward` and the feature `features[feature_rows[k]]`; `images`
    are this worker's training images (indices k). `num_batches`
    makes every data-parallel worker take the same number of steps (cycling a short shard).
    """

    def __init__(self, model: Decoder, vocab: Vocabulary, reward: CiderD, features: np.ndarray,
                 feature_rows: np.ndarray, images: np.ndarray, config: ScstConfig, batch_size: int,
                 rng_for_epoch: Callable[[int], np.random.Generator], num_batches: int | None = None) -> None:
        self.reward, self.features, self.feature_rows, self.config = reward, features, feature_rows, config
        self.images, self.batch_size, self.num_batches = np.asarray(images), batch_size, num_batches
        self._rng_for_epoch = rng_for_epoch
        self._sampler = CaptionSampler(model, config.samples, config.temperature, config.max_length)
        self._greedy = GreedyDecoder(model, config.max_length) if config.baseline == "greedy" else None
        # vocabulary id -> CIDEr-D word id; <pad> and <end> end the caption (0)
        self._word_ids = reward.word_ids(vocab.words)
        self._word_ids[[PAD_ID, END_ID]] = 0
        self._rewards: list[np.ndarray] = []

    def epoch(self, epoch: int) -> tuple[Iterator[Batch], int]:
        """The batches of epoch `epoch` (0-based) and how many there are; images shuffled per epoch."""
        rng = self._rng_for_epoch(epoch)
        order = rng.permutation(self.images)
        batches = [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        if self.num_batches is not None:
            batches = [batches[k % len(batches)] for k in range(self.num_batches)]
        self._rewards = []
        return self._batches(batches, rng), len(batches)

    def epoch_reward(self) -> float | None:
        """Mean reward of the captions sampled so far in the current epoch."""
        return float(np.concatenate(self._rewards).mean()) if self._rewards else None

    def rewards(self, ids: np.ndarray, images: np.ndarray) -> np.ndarray:
        """CIDEr-D of token-id captions ([N, L], up to `<end>` then `<pad>`) against their images' references."""
        return self.reward.scores(self._word_ids[ids], images)

    def _batches(self, batches: list[np.ndarray], rng: np.random.Generator) -> Iterator[Batch]:
        k = self.config.samples
        for batch_images in batches:
            features = self.features[self.feature_rows[batch_images]].astype(np.float32, copy=False)
            ids = self._sampler.sample(features, rng.integers(0, 2**62, size=2))
            rewards = self.rewards(ids, np.repeat(batch_images, k))
            self._rewards.append(rewards)
            if self._greedy is not None:
                baseline = np.repeat(self.rewards(self._greedy.search(features), batch_images), k)
            else:
                per_image = rewards.reshape(-1, k)
                baseline = ((per_image.sum(axis=1, keepdims=True) - per_image) / (k - 1)).reshape(-1)
            # The sampled captions are the targets of teacher forcing: <start> + caption[:-1] -> caption.
            width = max(int((ids != PAD_ID).sum(axis=1).max()), 1)
            targets = ids[:, :width]
            inputs = np.concatenate([np.full((len(ids), 1), START_ID, ids.dtype), targets[:, :-1]], axis=1)
            yield Batch(np.repeat(features, k, axis=0), inputs, targets, (rewards - baseline).astype(np.float32))
