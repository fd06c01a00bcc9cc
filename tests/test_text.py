import pytest

from imgcap.data.text import (
    END_ID,
    PAD_ID,
    RESERVED,
    START_ID,
    UNK_ID,
    Vocabulary,
    normalize,
)


def test_standard_mode_keeps_every_word_and_strips_punctuation():
    assert normalize("A dog's 2 red-balls, in   the Park!") == ["a", "dogs", "2", "redballs", "in", "the", "park"]


def test_seed_mode_drops_one_letter_words_and_words_with_digits():
    assert normalize("A dog's 2 red-balls, in the 3rd Park!", "seed") == ["dogs", "redballs", "in", "the", "park"]


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown text mode 'fancy'"):
        normalize("a dog", "fancy")


def test_vocabulary_min_count_order_and_reserved_ids():
    captions = [["a", "dog"], ["a", "cat"], ["a", "dog", "runs"]]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.words[: len(RESERVED)] == RESERVED
    assert vocab.words[len(RESERVED):] == ("a", "dog")  # by count, "cat"/"runs" below min count
    assert (vocab.id("<pad>"), vocab.id("<unk>"), vocab.id("<start>"), vocab.id("<end>")) == (
        PAD_ID, UNK_ID, START_ID, END_ID)
    assert vocab.id("cat") == UNK_ID


def test_encode_decode_and_truncation_keeps_end_token():
    vocab = Vocabulary.build([["a", "dog", "runs"]], min_count=1)
    ids = vocab.encode(["a", "dog", "flies"])
    assert ids[0] == START_ID and ids[-1] == END_ID and ids[3] == UNK_ID
    assert vocab.decode(ids) == ["a", "dog"]  # <unk> and reserved tokens are not words
    short = vocab.encode(["a", "dog", "runs"], max_length=3)
    assert short == [START_ID, vocab.id("a"), END_ID]


def test_vocabulary_round_trip(tmp_path):
    vocab = Vocabulary.build([["ein", "hund"], ["ein", "café"]], min_count=1, mode="seed")
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.mode == "seed"
    assert [loaded.id(w) for w in vocab.words] == list(range(len(vocab)))


def test_vocabulary_rejects_missing_reserved_tokens():
    with pytest.raises(ValueError, match="reserved tokens"):
        Vocabulary(("a", "b"))
