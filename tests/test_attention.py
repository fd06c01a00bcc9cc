"""The soft-attention decoder (imgcap/model/attention.py): incremental decoding equals teacher forcing, beam 1
equals greedy, the doubly stochastic penalty, bundles and ensembles, and learning the toy problem from a grid whose regions each
show one part of the image."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf
from toy import COLOURS, OBJECTS, fit_toy

from imgcap.config.model import DecodeConfig, ModelConfig, TextConfig
from imgcap.config.training import TrainConfig
from imgcap.data.feature_table import FeatureTable
from imgcap.data.text import PAD_ID, START_ID
from imgcap.model.attention import AttentionCaptionModel
from imgcap.model.beam import BeamSearchDecoder, CaptionSampler, GreedyDecoder
from imgcap.model.bundle import CaptionBundle, load_bundle
from imgcap.model.decoder import CaptionEnsemble, build_model, create_decoder
from imgcap.train.trainer import CaptionTrainer
from imgcap.vision.spec import EmbeddingSpec

ATTENTION = ModelConfig(architecture="attention", embedding_dim=32, units=64, attention_dim=32, dropout=0.1)
REGIONS = 4


def _tokens(rng: np.random.Generator, rows: int, steps: int, vocab_size: int) -> np.ndarray:
    tokens = rng.integers(4, vocab_size, size=(rows, steps)).astype(np.int32)
    tokens[:, 0] = START_ID
    return tokens


def test_incremental_steps_equal_the_teacher_forced_pass():
    model = create_decoder(ATTENTION, 40, 36, regions=9)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 36)).astype(np.float32)
    tokens = _tokens(rng, 5, 7, 40)
    forced = model((features, tokens)).numpy()
    image, state = model.initial_state(tf.constant(features))
    stepped = []
    for t in range(tokens.shape[1]):
        logits, state = model.step(tf.constant(tokens[:, t]), image, state)
        stepped.append(logits.numpy())
    np.testing.assert_allclose(np.stack(stepped, axis=1), forced, rtol=1e-5, atol=1e-5)


def test_beam_width_one_is_greedy_and_the_wider_beam_and_sampler_decode_the_grid():
    model = create_decoder(ATTENTION, 30, 36, regions=9)
    features = np.random.default_rng(1).normal(size=(6, 36)).astype(np.float32)
    greedy = GreedyDecoder(model, max_length=12).decode(features)
    beam1 = BeamSearchDecoder(model, beam_width=1, max_length=12).decode(features)
    assert beam1.tokens == greedy.tokens
    np.testing.assert_allclose(beam1.scores, greedy.scores, rtol=1e-5)
    beam3 = BeamSearchDecoder(model, beam_width=3, max_length=12).decode(features)
    assert len(beam3.tokens) == 6 and np.all(np.isfinite(beam3.scores))
    samples = CaptionSampler(model, samples=3, max_length=12).sample(features, np.array([3, 4]))
    assert samples.shape[0] == 18 and np.all(samples != START_ID)


def test_the_penalty_is_the_doubly_stochastic_term_over_each_captions_own_steps():
    config = ModelConfig(architecture="attention", embedding_dim=8, units=16, attention_dim=8, attention_penalty=0.5)
    model = create_decoder(config, 20, 24, regions=6)
    rng = np.random.default_rng(2)
    features = rng.normal(size=(3, 24)).astype(np.float32)
    tokens = _tokens(rng, 3, 5, 20)
    tokens[0, 3:] = PAD_ID  # a shorter caption: its padding attends to nothing
    _, penalty = model.forward((tf.constant(features), tf.constant(tokens)))
    alpha = model.attention(tf.constant(features), tf.constant(tokens)).numpy()  # [B, T, R]
    assert alpha.shape == (3, 5, 6)
    np.testing.assert_allclose(alpha.sum(axis=-1), 1.0, rtol=1e-5)
    total = (alpha * (tokens != PAD_ID)[..., None]).sum(axis=1)
    np.testing.assert_allclose(float(penalty), 0.5 * np.mean((1.0 - total) ** 2), rtol=1e-5)


def test_a_grid_is_required():
    with pytest.raises(ValueError, match='needs grid features.*pooling = "none"'):
        create_decoder(ATTENTION, 20, 16, regions=1)
    with pytest.raises(ValueError, match="16-d features over 5 region"):
        create_decoder(ATTENTION, 20, 16, regions=5)


def test_a_bundle_round_trip_captions_identically_and_ensembles_mix_architectures(tmp_path, toy):
    model = build_model(ATTENTION, toy.vocab, toy.table.dim, seed=0, regions=REGIONS)
    decode = DecodeConfig(beam_width=3, max_length=12)
    bundle = CaptionBundle(model, toy.vocab, TextConfig(min_count=1), decode, EmbeddingSpec("thumbnail", "none"))
    bundle.save(tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle")
    assert isinstance(loaded.model, AttentionCaptionModel) and loaded.model.regions == REGIONS
    assert loaded.caption(toy.dev_features) == bundle.caption(toy.dev_features)
    merge = build_model(ModelConfig(embedding_dim=16, units=32), toy.vocab, toy.table.dim, seed=1)
    ensemble = CaptionEnsemble([model, merge])
    tokens = BeamSearchDecoder(ensemble, beam_width=2, max_length=10).decode(toy.dev_features[:4]).tokens
    assert len(tokens) == 4


def _toy_grid(toy):
    """The toy problem as a CNN grid would hold it: 4 regions of the same 16 channels, where one region shows
    the colour, another the object and two show only noise (channels mean the same in every region)."""
    features = toy.table.features
    colour, thing = features.copy(), features.copy()
    colour[:, len(COLOURS):] *= 0.1
    thing[:, :len(COLOURS)] *= 0.1
    noise = np.random.default_rng(5).normal(0.0, 0.3, (2, *features.shape)).astype(np.float32)
    grid = np.stack([noise[0], colour, noise[1], thing], axis=1).reshape(len(features), -1)
    return replace(toy, table=FeatureTable(toy.table.ids, grid, toy.table.sources))


def test_attention_learns_the_toy_problem_from_its_regions(toy):
    """The captions must name the colour and the object, which sit in different regions of each image."""
    grid = _toy_grid(toy)
    model = build_model(ATTENTION, grid.vocab, grid.table.dim, seed=0, regions=REGIONS)

    def named() -> float:
        captions = [grid.vocab.decode(t) for t in GreedyDecoder(model, 20).decode(grid.dev_features).tokens]
        return float(np.mean([set(refs[0]) & (set(COLOURS) | set(OBJECTS)) <= set(caption)
                              for refs, caption in zip(grid.dev_references, captions)]))

    before = named()
    fit_toy(CaptionTrainer(model, TrainConfig(epochs=8, batch_size=32, learning_rate=3e-3, patience=0,
                                              select_by="loss")), grid)
    assert before < 0.2 and named() > 0.6  # measured: 0.80 after 8 epochs (a merge decoder: 0.74)
