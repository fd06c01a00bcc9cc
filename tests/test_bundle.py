"""Model bundles (imgcap/model/bundle.py): save / load round trips, ensembles of bundles, load errors; on toy
decoders trained once per session (tests/conftest.py `trained_toy`, both architectures)."""

import numpy as np
import pytest

from imgcap.config.model import DecodeConfig, ModelConfig, TextConfig
from imgcap.data.text import Vocabulary
from imgcap.model.bundle import CaptionBundle, combine_bundles, load_bundle
from imgcap.model.decoder import CaptionEnsemble, build_model
from imgcap.vision.spec import EmbeddingSpec


def test_bundle_round_trip_captions_identically(trained_toy, toy, tmp_path):
    model, vocab = trained_toy.model, trained_toy.vocab
    features = toy.dev_features
    decode = DecodeConfig(beam_width=3, max_length=20)
    bundle = CaptionBundle(model, vocab, TextConfig(), decode, EmbeddingSpec("thumbnail", resize="center_crop"),
                           provenance={"note": "test"})
    bundle.save(tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded.vocab == vocab and loaded.embedding == bundle.embedding and loaded.decode == decode
    assert loaded.fingerprint == bundle.fingerprint and loaded.fingerprint.startswith("sha256:")
    assert loaded.caption(features) == bundle.caption(features)
    for a, b in zip(loaded.model.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_ensemble_bundle_of_one_model_twice_captions_like_the_model(trained_toy, toy, tmp_path):
    model, vocab = trained_toy.model, trained_toy.vocab
    features = toy.dev_features
    single = CaptionBundle(model, vocab, TextConfig(), DecodeConfig(beam_width=3, max_length=20))
    twice = combine_bundles([single, single])
    assert isinstance(twice.model, CaptionEnsemble) and len(twice.members) == 2
    # Averaging identical log-probabilities changes nothing: same captions, saved and loaded as an ensemble.
    assert twice.caption(features) == single.caption(features)
    loaded = load_bundle(twice.save(tmp_path / "ens"))
    assert len(loaded.members) == 2 and loaded.caption(features) == single.caption(features)


def test_bundles_of_another_vocabulary_are_not_combined(trained_toy):
    model, vocab = trained_toy.model, trained_toy.vocab
    other = build_model(ModelConfig(embedding_dim=8, units=16), vocab, model.feature_dim, seed=3)
    a = CaptionBundle(model, vocab, TextConfig(), DecodeConfig())
    b = CaptionBundle(other, Vocabulary.build([["x"] * 12 + [f"w{i}" for i in range(12)]], 1), TextConfig(),
                      DecodeConfig())
    with pytest.raises(ValueError, match="another vocabulary"):
        combine_bundles([a, b])


def test_load_bundle_errors(tmp_path, trained_toy):
    with pytest.raises(FileNotFoundError, match="bundle.json is missing"):
        load_bundle(tmp_path)
    model, vocab = trained_toy.model, trained_toy.vocab
    CaptionBundle(model, vocab, TextConfig(), DecodeConfig()).save(tmp_path / "b")
    Vocabulary.build([["just", "two"]], 1).save(tmp_path / "b" / "vocab.json")
    with pytest.raises(ValueError, match="vocab.json has 6 words"):
        load_bundle(tmp_path / "b")
