"""Training examples: (image feature, caption token ids) pairs, batched by caption length.

Each caption becomes one example for teacher forcing over the whole sequence (inputs ``<start> w1 .. wn``,
targets ``w1 .. wn <end>``), not one sample per prefix as in the seed notebooks. Captions are bucketed by
length so a batch is padded only to its own longest caption: Flickr8k captions run from 3 to 40 tokens and
padding everything to the maximum would spend most of the compute on `<pad>`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from imgcap.config.model import TextConfig
from imgcap.config.training import DataConfig
from imgcap.data.captions import (
    CaptionCorpus,
    deterministic_split,
    read_captions,
    read_split_file,
)
from imgcap.data.feature_table import FeatureTable, load_features
from imgcap.data.text import PAD_ID, TextMode, Vocabulary, normalize
from imgcap.vision.spec import EmbeddingSpec, read_embedding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionExamples:
    """One row per caption: the row of its image in a feature matrix and its padded token ids."""

    image_rows: np.ndarray  # [N] int64, row into the feature matrix
    tokens: np.ndarray  # [N, T] int32, <start> .. <end> then <pad>
    lengths: np.ndarray  # [N] int32, tokens before padding

    def __len__(self) -> int:
        return len(self.image_rows)

    def shard(self, index: int, count: int) -> CaptionExamples:
        """Every `count`-th example starting at `index`: the part one of `count` data-parallel workers reads."""
        return CaptionExamples(self.image_rows[index::count], self.tokens[index::count], self.lengths[index::count])


def tokenize_corpus(corpus: CaptionCorpus, ids: Sequence[str], mode: TextMode) -> dict[str, list[list[str]]]:
    """Normalised, tokenised captions of the images `ids` (captions that normalise to nothing are dropped)."""
    out = {}
    for image_id in ids:
        tokenised = [t for t in (normalize(c, mode) for c in corpus.captions[image_id]) if t]
        if tokenised:
            out[image_id] = tokenised
    return out


def build_examples(
    captions: Mapping[str, Sequence[Sequence[str]]],
    image_rows: Mapping[str, int],
    vocab: Vocabulary,
    max_length: int,
) -> CaptionExamples:
    """Encode tokenised `captions` (image id -> captions) against `vocab`; `image_rows` maps id -> feature row."""
    rows, encoded = [], []
    for image_id, caps in captions.items():
        for caption in caps:
            rows.append(image_rows[image_id])
            encoded.append(vocab.encode(caption, max_length))
    if not encoded:
        raise ValueError("no captions to build examples from")
    lengths = np.array([len(e) for e in encoded], dtype=np.int32)
    tokens = np.full((len(encoded), int(lengths.max())), PAD_ID, dtype=np.int32)
    for k, e in enumerate(encoded):
        tokens[k, : len(e)] = e
    return CaptionExamples(np.array(rows, dtype=np.int64), tokens, lengths)


@dataclass(frozen=True)
class Batch:
    """A training batch: image features, decoder inputs and targets (both [B, T], padded with 0), and the
    weight of each caption's loss (1 in cross-entropy training; the advantage in self-critical training)."""

    features: np.ndarray
    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray


def iterate_batches(
    examples: CaptionExamples,
    features: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None = None,
    num_batches: int | None = None,
) -> Iterator[Batch]:
    """Length-bucketed batches of `examples`; shuffled within and across buckets when `rng` is given.

    Examples are sorted by length (after a random permutation, so equal lengths mix), cut into batches of
    `batch_size` and the batch order is shuffled: every batch holds captions of nearly equal length.
    With `num_batches`, the epoch is cut or cycled to exactly that many batches (data-parallel workers must
    all take the same number of steps).
    """
    n = len(examples)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    order = order[np.argsort(examples.lengths[order], kind="stable")]
    batches = [order[k : k + batch_size] for k in range(0, n, batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    if num_batches is not None:
        batches = [batches[k % len(batches)] for k in range(num_batches)]
    for rows in batches:
        width = int(examples.lengths[rows].max())
        tokens = examples.tokens[rows, :width]
        yield Batch(features[examples.image_rows[rows]].astype(np.float32, copy=False), tokens[:, :-1], tokens[:, 1:],
                    np.ones(len(rows), np.float32))


@dataclass(frozen=True)
class TrainingData:
    """Everything training reads: vocabulary, features of train+dev images, examples and dev references."""

    vocab: Vocabulary
    features: FeatureTable  # every image of the features file; examples name their rows
    embedding: EmbeddingSpec | None  # how the features were made, when the features file records it
    train_ids: list[str]
    dev_ids: list[str]
    train: CaptionExamples
    dev: CaptionExamples
    dev_references: dict[str, list[list[str]]]  # dev image id -> normalised reference captions
    train_references: dict[str, list[list[str]]]  # train image id -> normalised reference captions (untruncated)

    @property
    def regions(self) -> int:
        """Region features per image (a grid's h x w for an attention decoder; 1 for feature vectors)."""
        return self.embedding.regions if self.embedding is not None else 1


def _limit(ids: list[str], limit: int) -> list[str]:
    return ids[:limit] if limit else ids


def prepare_training_data(data: DataConfig, text: TextConfig, vocab: Vocabulary | None = None) -> TrainingData:
    """Read captions, splits and features; build (or reuse) the vocabulary and the caption examples.

    Images without features or without captions are left out of a split and counted in a log line, never
    dropped silently; a split that ends up empty is an error naming the file to check.
    """
    corpus = read_captions(data.captions, data.captions_format, data.skip_malformed)
    table = load_features(data.features)
    with_features = set(table.ids)
    if data.train_split:
        train_ids, dev_ids = read_split_file(data.train_split), read_split_file(data.dev_split)
    elif corpus.splits:
        train_ids, dev_ids = corpus.splits.get("train", []), corpus.splits.get("dev", [])
    else:
        train_ids, dev_ids = deterministic_split(corpus.captions, data.dev_fraction)
    splits = {}
    for name, ids, limit in (("train", train_ids, data.max_train_images), ("dev", dev_ids, data.max_dev_images)):
        usable = [i for i in ids if i in with_features and i in corpus.captions]
        if len(usable) < len(ids):
            log.warning("%s split: %d of %d images have no features or no captions and are left out",
                        name, len(ids) - len(usable), len(ids))
        if not usable:
            raise ValueError(f"the {name} split has no image with both captions ({data.captions}) "
                             f"and features ({data.features}); check that their image ids match")
        splits[name] = _limit(usable, limit)
    train_tokens = tokenize_corpus(corpus, splits["train"], text.mode)
    dev_tokens = tokenize_corpus(corpus, splits["dev"], text.mode)
    if vocab is None:
        vocab = Vocabulary.build((c for caps in train_tokens.values() for c in caps), text.min_count, text.mode)
    elif vocab.mode != text.mode:
        raise ValueError(f"the vocabulary was built with text mode {vocab.mode!r} but text.mode is {text.mode!r}")
    # Examples name their image's row of the whole table: no copy of the features (a grid table is GBs).
    rows = table.index()
    return TrainingData(
        vocab=vocab,
        features=table,
        train_ids=list(train_tokens),
        dev_ids=list(dev_tokens),
        train=build_examples(train_tokens, rows, vocab, text.max_length),
        dev=build_examples(dev_tokens, rows, vocab, text.max_length),
        dev_references=dev_tokens,
        train_references=train_tokens,
        embedding=read_embedding(data.features) or (EmbeddingSpec.from_tag(data.backbone) if data.backbone else None),
    )
