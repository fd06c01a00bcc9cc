"""Caption quality: BLEU-1..4 (NLTK and coco-caption) and CIDEr against reference captions.

Two scorers, because published tables use both:

- ``nltk``: NLTK's ``corpus_bleu`` with cumulative n-gram weights, as the seed notebooks report it, plus a
  per-image sentence BLEU-4 (smoothing method 1, so short captions without 4-gram matches do not score 0).
- ``coco``: the coco-caption scorers (``pycocoevalcap`` ``Bleu`` and ``Cider``, pure Python, no Java) used by
  most captioning papers. Optional dependency: ``pip install 'imgcap[coco]'``.

Hypotheses and references are token lists produced by the same text normalisation (see `imgcap.data.text`); every
report records that mode, the split, the decoding and the scorer, so a figure is never quoted without them.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

Tokens = Sequence[str]
_WEIGHTS = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]


def nltk_corpus_bleu(references: Sequence[Sequence[Tokens]], hypotheses: Sequence[Tokens]) -> list[float]:
    """Corpus BLEU-1..4 (cumulative weights) of `hypotheses`, each against its list of `references`."""
    _check_aligned(references, hypotheses)
    refs = [[list(r) for r in rs] for rs in references]
    hyps = [list(h) for h in hypotheses]
    with warnings.catch_warnings():  # NLTK warns when an n-gram order has no match; a 0 score says as much
        warnings.simplefilter("ignore", UserWarning)
        return [float(corpus_bleu(refs, hyps, weights=w)) for w in _WEIGHTS]


def nltk_sentence_bleu(references: Sequence[Tokens], hypothesis: Tokens) -> float:
    """BLEU-4 of one caption against its references (smoothing method 1)."""
    return float(sentence_bleu([list(r) for r in references], list(hypothesis),
                               smoothing_function=SmoothingFunction().method1))


def coco_available() -> bool:
    """Whether the optional coco-caption scorers (pycocoevalcap) are installed."""
    return importlib.util.find_spec("pycocoevalcap") is not None


def coco_scores(references: Sequence[Sequence[Tokens]], hypotheses: Sequence[Tokens]) -> dict[str, float]:
    """coco-caption BLEU-1..4 and CIDEr (pycocoevalcap), on already-normalised tokens."""
    _check_aligned(references, hypotheses)
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as exc:  # optional extra
        raise ImportError("the coco scorer needs pycocoevalcap: pip install 'imgcap[coco]'") from exc
    gts = {k: [" ".join(r) for r in rs] for k, rs in enumerate(references)}
    res = {k: [" ".join(h)] for k, h in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu1": bleu[0], "bleu2": bleu[1], "bleu3": bleu[2], "bleu4": bleu[3], "cider": float(cider)}


def _check_aligned(references: Sequence, hypotheses: Sequence) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("nothing to score: no hypotheses")
    if any(len(rs) == 0 for rs in references):
        raise ValueError("every hypothesis needs at least one reference caption")


@dataclass(frozen=True)
class EvaluationReport:
    """Scores of one set of captions, with everything needed to quote them."""

    split: str
    text_mode: str
    decoding: str  # "greedy" or "beam-K" (with length penalty if any)
    num_images: int
    nltk_bleu: list[float]
    coco: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: the figures and how they were made."""
        nltk = " ".join(f"B{n + 1}={b:.4f}" for n, b in enumerate(self.nltk_bleu))
        line = f"[{self.split}, {self.num_images} images, text={self.text_mode}, {self.decoding}] nltk {nltk}"
        if self.coco:
            coco = " ".join(f"B{n}={self.coco[f'bleu{n}']:.4f}" for n in range(1, 5))
            line += f" | coco {coco} CIDEr={self.coco['cider']:.4f}"
        return line


def evaluate_captions(
    references: Mapping[str, Sequence[Tokens]],
    hypotheses: Mapping[str, Tokens],
    *,
    split: str,
    text_mode: str,
    decoding: str,
    coco: bool = True,
) -> EvaluationReport:
    """Score `hypotheses` (image id -> tokens) against `references` (image id -> token lists)."""
    missing = [i for i in hypotheses if i not in references]
    if missing:
        raise KeyError(f"{len(missing)} captioned image(s) have no references, e.g. {missing[:3]}")
    ids = sorted(hypotheses)
    refs = [references[i] for i in ids]
    hyps = [hypotheses[i] for i in ids]
    return EvaluationReport(split, text_mode, decoding, len(ids), nltk_corpus_bleu(refs, hyps),
                            coco_scores(refs, hyps) if coco else {})
