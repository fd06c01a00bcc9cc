"""CIDEr-D (imgcap/metrics/cider.py), checked against coco-caption's own scorer (pycocoevalcap, pure Python) on
the same references."""

from __future__ import annotations

import numpy as np
import pytest
from _imaging import SHARED

from imgcap.data.dataset import tokenize_corpus
from imgcap.metrics.cider import CiderD

REFERENCES = [
    ["a dog runs on the grass", "a brown dog is running", "the dog runs across a field"],
    ["two children play in the water", "kids splash in a pool", "two kids are swimming"],
    ["a man rides a bike", "a man on a bicycle", "a cyclist rides down the road", "a man riding a bike"],
    ["a dog jumps over a log", "a black dog jumping", "dog leaps over wood"],
]
HYPOTHESES = [
    "a dog runs on the grass",  # a reference itself
    "two kids play in a pool pool pool",  # repeated n-grams: clipping
    "a man rides",  # short: the length penalty
    "",  # empty
    "a zebra eats purple hay",  # words no reference has (document frequency 0)
    "a dog a dog a dog a dog a dog a dog a dog a dog",  # long and repetitive
    "man",
    "a black dog jumping over a log",
]
IMAGES = [0, 1, 2, 3, 0, 3, 2, 1]


def coco_cider(references: list[list[str]], hypotheses: list[str]) -> np.ndarray:
    from pycocoevalcap.cider.cider import Cider

    _, scores = Cider().compute_score({k: refs for k, refs in enumerate(references)},
                                      {k: [h] for k, h in enumerate(hypotheses)})
    return np.asarray(scores)


def test_cider_d_equals_coco_caption_cider():
    # coco-caption scores a hypothesis per image, with document frequencies over the images it is given:
    # one call per hypothesis-image pairing, the same references each time.
    refs = [REFERENCES[i] for i in IMAGES]
    expected = coco_cider(refs, HYPOTHESES)
    ours = CiderD([[r.split() for r in rs] for rs in refs]).score_captions([h.split() for h in HYPOTHESES])
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)
    assert ours[0] > ours[2] > 0 and ours[3] == 0 and ours[0] == ours.max()


def test_cider_d_with_fixed_document_frequencies_scores_any_pairing():
    """Built once over the four images' references, it scores hypotheses against any image: the same as
    coco-caption over those four images when each hypothesis is set against its own image."""
    scorer = CiderD([[r.split() for r in rs] for rs in REFERENCES])
    for start in (0, 4):  # each block of four captions covers the four images once
        block = range(start, start + 4)
        order = sorted(block, key=lambda k: IMAGES[k])
        expected = coco_cider(REFERENCES, [HYPOTHESES[k] for k in order])
        ours = scorer.score_captions([HYPOTHESES[k].split() for k in order], [IMAGES[k] for k in order])
        np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def flickr8k_dev_references():
    from imgcap.data.captions import read_captions, read_split_file

    flickr = SHARED / "flickr8k"
    if not (flickr / "Flickr8k.token.txt").is_file():
        pytest.skip(f"the shared Flickr8k captions are not in {flickr}")
    corpus = read_captions(flickr / "Flickr8k.token.txt", "auto", False)
    ids = read_split_file(flickr / "Flickr_8k.devImages.txt")
    tokens = tokenize_corpus(corpus, ids, "standard")
    return [tokens[i] for i in ids]


def test_cider_d_on_flickr8k_dev_matches_coco_caption(flickr8k_dev_references):
    refs = flickr8k_dev_references[:200]
    rng = np.random.default_rng(0)
    hypotheses = [refs[(k * 7) % len(refs)][k % 5][: rng.integers(1, 15)] for k in range(len(refs))]
    expected = coco_cider([[" ".join(r) for r in rs] for rs in refs], [" ".join(h) for h in hypotheses])
    np.testing.assert_allclose(CiderD(refs).score_captions(hypotheses), expected, rtol=1e-10, atol=1e-12)
