"""Caption generation (imgcap/model/beam.py): greedy and beam search, and sampling, on toy decoders trained
once per session (tests/conftest.py `trained_toy`, both architectures)."""

import numpy as np
import pytest
import tensorflow as tf

from imgcap.config.model import DecodeConfig, ModelConfig
from imgcap.data.text import END_ID, PAD_ID, START_ID, UNK_ID
from imgcap.model.beam import (
    BeamSearchDecoder,
    CaptionSampler,
    GreedyDecoder,
    _repeat_ban,
    make_decoder,
)
from imgcap.model.decoder import create_decoder


def test_beam_width_one_equals_greedy(trained_toy, toy):
    model = trained_toy.model
    features = toy.dev_features
    greedy = GreedyDecoder(model, 20).decode(features)
    beam = BeamSearchDecoder(model, beam_width=1, max_length=20).decode(features)
    assert beam.tokens == greedy.tokens
    np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5, atol=1e-5)


def test_beam_search_finds_captions_at_least_as_likely_as_greedy(trained_toy, toy):
    model = trained_toy.model
    features = toy.dev_features
    greedy = GreedyDecoder(model, 20).decode(features)
    beam = BeamSearchDecoder(model, beam_width=4, max_length=20).decode(features)
    # A wider beam keeps greedy's path among its candidates, so its best total log-probability is never lower.
    assert (beam.scores >= greedy.scores - 1e-4).all()
    assert all(t and UNK_ID not in t and PAD_ID not in t and START_ID not in t for t in beam.tokens)


def test_decoding_matches_teacher_forced_log_probability(trained_toy, toy):
    model = trained_toy.model
    features = toy.dev_features[:8]
    decoded = GreedyDecoder(model, 20).decode(features)
    for k, ids in enumerate(decoded.tokens):
        sequence = np.array([[START_ID] + ids + [3]], dtype=np.int32)  # ... <end>
        logits = model((features[k : k + 1], sequence[:, :-1]))
        logits = logits.numpy()[0]
        logits[:, [PAD_ID, UNK_ID, START_ID]] = -1e9
        log_probs = tf.nn.log_softmax(logits).numpy()
        expected = sum(log_probs[t, sequence[0, t + 1]] for t in range(len(ids) + 1))
        assert decoded.scores[k] == pytest.approx(expected, abs=1e-3)


def test_length_penalty_prefers_longer_captions(trained_toy, toy):
    model = trained_toy.model
    features = toy.dev_features
    plain = BeamSearchDecoder(model, 5, 20, length_penalty=0.0).decode(features)
    long = BeamSearchDecoder(model, 5, 20, length_penalty=2.0).decode(features)
    assert np.mean([len(t) for t in long.tokens]) >= np.mean([len(t) for t in plain.tokens])


def test_decoder_rejects_wrong_feature_size(trained_toy):
    model = trained_toy.model
    with pytest.raises(ValueError, match=r"expected features of shape \[N, 16\]"):
        make_decoder(model, DecodeConfig(beam_width=1)).decode(np.zeros((2, 5), np.float32))


def test_sampling_at_temperature_near_zero_gives_the_greedy_caption(toy, toy_models):
    model = toy_models.trained("merge").model
    features = toy.table.features[:64]
    greedy = GreedyDecoder(model, 20).search(features)
    cold = CaptionSampler(model, samples=3, temperature=1e-4, max_length=20).sample(features, np.array([3, 4]))
    width = max(greedy.shape[1], cold.shape[1])
    pad = lambda ids: np.pad(ids, ((0, 0), (0, width - ids.shape[1])))  # noqa: E731
    for k in range(3):  # every sample of every image, image-major rows
        np.testing.assert_array_equal(pad(cold)[k::3], pad(greedy))
    warm = CaptionSampler(model, samples=3, temperature=1.0, max_length=20).sample(features, np.array([3, 4]))
    assert not np.array_equal(pad(warm)[0::3], pad(warm)[1::3])  # at temperature 1 samples differ
    again = CaptionSampler(model, samples=3, temperature=1.0, max_length=20).sample(features, np.array([3, 4]))
    np.testing.assert_array_equal(warm, again)  # the same seed draws the same captions
    ended = (warm == END_ID).any(axis=1)
    for row in warm[ended]:  # <pad> follows <end>, never a word
        end = int(np.argmax(row == END_ID))
        assert (row[end + 1 :] == PAD_ID).all() and not np.isin(row[:end], [PAD_ID, START_ID]).any()


def _repeats(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def test_the_repeat_ban_forbids_exactly_the_words_that_would_repeat_an_ngram():
    rng = np.random.default_rng(0)
    vocab, length = 6, 12
    history = rng.integers(4, vocab, size=(64, length)).astype(np.int32)  # 2 words: repeats are everywhere
    for n in (2, 3, 4):
        for t in range(length):
            bias = _repeat_ban(tf.constant(history), tf.constant(t), vocab, n).numpy()
            for row, words in zip(bias, history):
                written = words[:t].tolist()
                # the brute force: a word is banned iff the n words it would end are already in the caption
                grams = {tuple(written[i : i + n]) for i in range(len(written) - n + 1)}
                expected = {w for w in range(vocab) if len(written) >= n - 1
                            and tuple(written[len(written) - n + 1 :] + [w]) in grams}
                assert set(np.flatnonzero(row < -1e8)) == expected, (n, t, written)
                assert (row[row > -1e8] == 0).all()


@pytest.fixture(scope="module")
def untrained_merge():
    # An untrained decoder repeats itself ("w w w ..."), so it shows the ban at work.
    import keras

    keras.utils.set_random_seed(3)
    return create_decoder(ModelConfig(units=16, embedding_dim=8), 12, 5)


@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_size_keeps_greedy_and_beam_captions_free_of_repeats(untrained_merge, n):
    features = np.random.default_rng(1).normal(size=(32, 5)).astype(np.float32)
    free = [GreedyDecoder(untrained_merge, 15), BeamSearchDecoder(untrained_merge, 3, 15)]
    assert all(any(_repeats(ids, n) for ids in d.decode(features).tokens) for d in free)  # the ban has work
    for decode in (DecodeConfig(beam_width=1, max_length=15, no_repeat_ngram_size=n),
                   DecodeConfig(beam_width=3, max_length=15, no_repeat_ngram_size=n)):
        decoded = make_decoder(untrained_merge, decode).decode(features)
        assert not any(_repeats(ids, n) for ids in decoded.tokens), decode.label


def test_with_the_ban_beam_width_one_is_greedy_and_scores_stay_model_log_probabilities(trained_toy, toy):
    model = trained_toy.model
    features = toy.dev_features[:16]
    greedy = GreedyDecoder(model, 20, no_repeat_ngram_size=2).decode(features)
    beam = BeamSearchDecoder(model, beam_width=1, max_length=20, no_repeat_ngram_size=2).decode(features)
    assert beam.tokens == greedy.tokens
    np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5, atol=1e-5)
    for k, ids in enumerate(greedy.tokens):  # the ban removes words; it does not renormalise the others
        sequence = np.array([[START_ID] + ids + [END_ID]], dtype=np.int32)
        logits = model((features[k : k + 1], sequence[:, :-1])).numpy()[0]
        logits[:, [PAD_ID, UNK_ID, START_ID]] = -1e9
        log_probs = tf.nn.log_softmax(logits).numpy()
        assert greedy.scores[k] == pytest.approx(sum(log_probs[t, sequence[0, t + 1]] for t in range(len(ids) + 1)),
                                                 abs=1e-3)


def test_no_repeat_ngram_size_is_validated_and_labelled():
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be 0"):
        DecodeConfig(no_repeat_ngram_size=1)
    assert DecodeConfig(beam_width=5, length_penalty=1.0, no_repeat_ngram_size=3).label == \
        "beam-5 (length penalty 1, no repeated 3-grams)"
    assert DecodeConfig(beam_width=1, no_repeat_ngram_size=2).label == "greedy (no repeated 2-grams)"
