"""CIDEr-D (Vedantam et al. 2015) of many captions at once: the reward of self-critical training and the dev
CIDEr of model selection.

It computes what coco-caption's ``Cider`` scorer computes (``pycocoevalcap/cider/cider_scorer.py``, which is
CIDEr-D: clipped tf-idf n-gram vectors, n = 1..4, a Gaussian length penalty with sigma 6, x10), to float
rounding (tested against it), with three differences of design:

- the document frequencies are computed once, over a fixed reference corpus (for the reward: the training
  references; coco-caption recomputes them over whatever set it is asked to score), and kept with the table
  of reference n-grams;
- a batch of hypotheses is scored in a handful of numpy array operations (n-grams are int64 keys; lookups are
  `np.searchsorted` into sorted key tables), not a Python loop per n-gram: self-critical training scores
  k samples of every training image each epoch;
- no Java and no external tokenizer: captions are the already-normalised tokens of `imgcap.data.text`.

An n-gram of word ids w1..wn (ids >= 1; 0 is padding) is the key ``sum w_i * B ** (n - i)`` with
``B = _BASE``; the orders occupy disjoint key ranges, so a key also says its order. int64 keys allow
``_BASE - 1`` distinct words (55,107), more than the Flickr and COCO reference corpora hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_N = 4
_BASE = 55108  # the largest B with B**4 < 2**63
_ORDER_STARTS = np.array([_BASE ** n for n in range(MAX_N)], dtype=np.int64)  # smallest key of each order


def _ngram_keys(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, key) of every n-gram (n = 1..4) of a [H, T] matrix of word ids (0-padded at the end)."""
    rows, keys = [], []
    height, width = words.shape
    index = np.broadcast_to(np.arange(height)[:, None], words.shape)
    key = np.zeros(words.shape, dtype=np.int64)
    for n in range(1, MAX_N + 1):
        if n > width:
            break
        # key[:, i] holds the n-gram starting at i once the n-th word is folded in
        span = width - n + 1
        last = words[:, n - 1 : n - 1 + span].astype(np.int64)
        key = key[:, :span] * _BASE + last
        valid = last > 0  # padding only follows words, so the last word being a word makes all of them words
        rows.append(index[:, :span][valid])
        keys.append(key[valid])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(keys)


def _count_pairs(rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (row, key) pairs and how often each occurs (term frequencies per caption)."""
    if len(rows) == 0:
        return rows, keys, np.zeros(0, np.int64)
    order = np.lexsort((keys, rows))
    rows, keys = rows[order], keys[order]
    starts = np.flatnonzero(np.r_[True, (rows[1:] != rows[:-1]) | (keys[1:] != keys[:-1])])
    return rows[starts], keys[starts], np.diff(np.r_[starts, len(rows)])


def _order_of(keys: np.ndarray) -> np.ndarray:
    """0-based n-gram order of each key."""
    return np.searchsorted(_ORDER_STARTS, keys, side="right") - 1


def _lengths(words: np.ndarray) -> np.ndarray:
    """coco-caption's caption "length": its number of bigrams (words - 1, at least 0)."""
    return np.maximum((words > 0).sum(axis=1) - 1, 0)


class CiderD:
    """CIDEr-D against a fixed corpus of references: ``references[i]`` are image i's reference captions.

    Document frequencies (in how many images' references an n-gram occurs) and every reference's tf-idf
    norms are computed once, here; `scores` then rates any hypotheses against the references of their images.
    """

    def __init__(self, references: Sequence[Sequence[Sequence[str]]], sigma: float = 6.0) -> None:
        if not references or any(len(refs) == 0 for refs in references):
            raise ValueError("CIDEr-D needs at least one image, and every image at least one reference caption")
        self.sigma = sigma
        self._words: dict[str, int] = {}
        self.num_images = len(references)
        self.num_refs = np.array([len(refs) for refs in references], dtype=np.int64)
        max_refs = int(self.num_refs.max())
        flat = [ref for refs in references for ref in refs]
        ref_image = np.repeat(np.arange(self.num_images), self.num_refs)
        ref_slot = np.concatenate([np.arange(n) for n in self.num_refs])
        words = self.encode(flat)
        # Every reference's n-grams with their counts; then the dictionary of all reference n-grams (dense ids).
        ref_rows, keys, counts = _count_pairs(*_ngram_keys(words))
        self._keys = np.unique(keys)
        dense = np.searchsorted(self._keys, keys)
        images = ref_image[ref_rows]
        # Document frequency: the number of images whose references hold the n-gram (once per image).
        per_image = np.unique(images * len(self._keys) + dense)
        df = np.bincount(per_image % len(self._keys), minlength=len(self._keys))
        self._log_images = float(np.log(self.num_images))
        self._idf = self._log_images - np.log(np.maximum(df, 1.0))
        # The reference table: one row per (image, n-gram), the n-gram's count in each of the image's references.
        self._table_keys, table_rows = np.unique(images * len(self._keys) + dense, return_inverse=True)
        self._table_counts = np.zeros((len(self._table_keys), max_refs), dtype=np.float64)
        np.add.at(self._table_counts, (table_rows, ref_slot[ref_rows]), counts)
        weights = counts * self._idf[dense]
        norms = np.zeros((self.num_images, max_refs, MAX_N))
        np.add.at(norms, (images, ref_slot[ref_rows], _order_of(keys)), weights ** 2)
        self._ref_norms = np.sqrt(norms)
        self._ref_lengths = np.zeros((self.num_images, max_refs), dtype=np.int64)
        self._ref_lengths[ref_image, ref_slot] = _lengths(words)
        self._ref_mask = np.arange(max_refs)[None, :] < self.num_refs[:, None]

    def word_ids(self, words: Sequence[str]) -> np.ndarray:
        """The ids of `words` in this scorer's word index; words never seen before get new ids (their n-grams
        occur in no reference: document frequency 0)."""
        ids = np.empty(len(words), dtype=np.int64)
        for k, word in enumerate(words):
            ids[k] = self._words.setdefault(word, len(self._words) + 1)
        if len(self._words) >= _BASE:
            raise ValueError(f"CIDEr-D: more than {_BASE - 1} distinct words; n-gram keys would overflow int64")
        return ids

    def encode(self, captions: Sequence[Sequence[str]]) -> np.ndarray:
        """A [len(captions), longest] matrix of word ids, 0-padded."""
        width = max((len(c) for c in captions), default=0)
        matrix = np.zeros((len(captions), max(width, 1)), dtype=np.int64)
        for k, caption in enumerate(captions):
            matrix[k, : len(caption)] = self.word_ids(caption)
        return matrix

    def scores(self, hypotheses: np.ndarray, images: np.ndarray) -> np.ndarray:
        """CIDEr-D of each row of `hypotheses` ([H, T] word ids from `word_ids`, 0-padded) against the
        references of image ``images[h]``; [H] float64."""
        hypotheses, images = np.asarray(hypotheses), np.asarray(images, dtype=np.int64)
        height = len(hypotheses)
        rows, keys, counts = _count_pairs(*_ngram_keys(hypotheses))
        orders = _order_of(keys)
        dense = np.minimum(np.searchsorted(self._keys, keys), max(len(self._keys) - 1, 0))
        seen = self._keys[dense] == keys
        idf = np.where(seen, self._idf[dense], self._log_images)  # unseen n-grams: document frequency 0
        weights = counts * idf
        norms = np.sqrt(np.bincount(rows * MAX_N + orders, weights ** 2, minlength=height * MAX_N)).reshape(height, MAX_N)
        # The clipped dot product with each reference, over the n-grams the image's references hold.
        max_refs = self._table_counts.shape[1]
        dots = np.zeros((height, max_refs, MAX_N))
        lookup = images[rows] * len(self._keys) + dense
        position = np.minimum(np.searchsorted(self._table_keys, lookup), len(self._table_keys) - 1)
        found = seen & (self._table_keys[position] == lookup)
        ref_weights = self._table_counts[position[found]] * idf[found, None]  # [E, refs]
        clipped = np.minimum(weights[found, None], ref_weights) * ref_weights
        np.add.at(dots, (rows[found, None], np.arange(max_refs)[None, :], orders[found, None]), clipped)
        products = norms[:, None, :] * self._ref_norms[images]
        cosines = dots / np.where(products > 0, products, 1.0)
        delta = (_lengths(hypotheses)[:, None] - self._ref_lengths[images]).astype(np.float64)
        penalty = np.exp(-(delta ** 2) / (2 * self.sigma ** 2))
        per_ref = cosines.mean(axis=-1) * penalty * self._ref_mask[images]
        return 10.0 * per_ref.sum(axis=1) / self.num_refs[images]

    def score_captions(self, captions: Sequence[Sequence[str]], images: Sequence[int] | None = None) -> np.ndarray:
        """CIDEr-D of token lists; ``captions[h]`` against image ``images[h]`` (default: image h)."""
        images = np.arange(len(captions)) if images is None else np.asarray(images)
        return self.scores(self.encode(captions), images)
