import math

import pytest

from imgcap.metrics.evaluate import (
    coco_scores,
    evaluate_captions,
    nltk_corpus_bleu,
    nltk_sentence_bleu,
)

REF = "the cat is on the mat".split()
HYP = "the cat sat on the mat".split()


def test_nltk_bleu_on_a_case_worked_by_hand():
    # Unigrams: 5 of 6 match; bigrams: "the cat", "on the", "the mat" = 3 of 5; trigrams: "on the mat" = 1 of 4;
    # same length, so no brevity penalty.
    b1, b2, b3, b4 = nltk_corpus_bleu([[REF]], [HYP])
    assert b1 == pytest.approx(5 / 6)
    assert b2 == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b3 == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert b4 == pytest.approx(0.0, abs=1e-9)  # no 4-gram matches


def test_identical_captions_score_one_with_both_scorers():
    refs = [[REF, HYP], ["a dog runs on the grass".split()]]
    hyps = [HYP, "a dog runs on the grass".split()]
    assert nltk_corpus_bleu(refs, hyps) == pytest.approx([1.0] * 4)
    coco = coco_scores(refs, hyps)
    assert [coco[f"bleu{n}"] for n in range(1, 5)] == pytest.approx([1.0] * 4, abs=1e-6)


def test_brevity_penalty_in_coco_bleu():
    # A 3-word hypothesis against a 6-word reference: precision 1, brevity penalty exp(1 - 6/3).
    coco = coco_scores([[REF]], [["the", "cat", "is"]])
    assert coco["bleu1"] == pytest.approx(math.exp(1 - 6 / 3), rel=1e-4)


def test_sentence_bleu_is_smoothed_and_ordered():
    good = nltk_sentence_bleu([REF], HYP)
    bad = nltk_sentence_bleu([REF], "the dog".split())
    assert 0.0 < bad < good < 1.0


def test_cider_ranks_a_matching_caption_above_an_unrelated_one():
    refs = [["a dog runs".split(), "a dog is running".split()], ["a red car".split(), "the red car".split()],
            ["two birds fly".split(), "birds in the sky".split()]]
    good = coco_scores(refs, [["a", "dog", "runs"], ["a", "red", "car"], ["two", "birds", "fly"]])["cider"]
    bad = coco_scores(refs, [["a", "red", "car"], ["two", "birds", "fly"], ["a", "dog", "runs"]])["cider"]
    assert good > bad


def test_evaluate_captions_reports_how_figures_were_made():
    report = evaluate_captions({"x": [REF]}, {"x": HYP}, split="dev", text_mode="standard", decoding="beam-3")
    assert report.num_images == 1 and report.coco["bleu1"] == pytest.approx(5 / 6, rel=1e-4)
    assert "dev" in report.summary() and "beam-3" in report.summary() and "text=standard" in report.summary()


def test_misaligned_or_missing_references_are_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference"):
        nltk_corpus_bleu([[REF]], [HYP, HYP])
    with pytest.raises(KeyError, match="no references"):
        evaluate_captions({"x": [REF]}, {"y": HYP}, split="dev", text_mode="standard", decoding="greedy")
