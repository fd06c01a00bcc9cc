"""Self-critical training (imgcap/train/scst.py): the batches of sampled captions and their advantages, a short
run that raises the reward, and `scst.dropout`; real TensorFlow on the toy problem of tests/toy.py."""

from __future__ import annotations

import numpy as np
import pytest

from imgcap.config.loader import config_from_dict
from imgcap.config.model import ModelConfig
from imgcap.config.training import ScstConfig, TrainConfig, TrainJobConfig
from imgcap.data.text import PAD_ID, START_ID
from imgcap.metrics.cider import CiderD
from imgcap.model.beam import GreedyDecoder
from imgcap.model.decoder import build_model
from imgcap.train.batches import CaptionBatches
from imgcap.train.evaluation import DevEvaluator
from imgcap.train.loop import fit
from imgcap.train.losses import masked_token_loss
from imgcap.train.scst import SelfCriticalBatches
from imgcap.train.state import TrainingState, training_phases
from imgcap.train.trainer import CaptionTrainer


def cross_entropy_model(toy, epochs: int = 2):
    """A toy model after a short cross-entropy phase (captions right in kind, not yet in detail)."""
    model = build_model(ModelConfig(embedding_dim=32, units=64, dropout=0.1), toy.vocab, toy.table.dim, seed=0)
    evaluator = DevEvaluator(model, toy.vocab, toy.dev, toy.table.features, toy.dev_features, toy.dev_references)
    state = TrainingState("xe")
    trainer = CaptionTrainer(model, TrainConfig(epochs=epochs, batch_size=32, learning_rate=3e-3, patience=0,
                                                select_by="loss"))
    batches = CaptionBatches(toy.train, toy.table.features, 32, lambda epoch: np.random.default_rng(epoch))
    fit(trainer, evaluator, state, batches, num_images=320, num_captions=len(toy.train), progress=False)
    return model, evaluator, state


@pytest.fixture(scope="module")
def one_epoch_model(toy):
    """After one cross-entropy epoch; the tests only sample from it."""
    return cross_entropy_model(toy, epochs=1)[0]


def scst_batches(toy, model, config: ScstConfig) -> SelfCriticalBatches:
    return SelfCriticalBatches(model, toy.vocab, CiderD(toy.train_references), toy.table.features, np.arange(320),
                               np.arange(320), config, config.batch_size, lambda epoch: np.random.default_rng([7, epoch]))


def test_mean_baseline_advantages_sum_to_zero_per_image_and_targets_are_the_samples(toy, one_epoch_model):
    batches, count = scst_batches(toy, one_epoch_model, ScstConfig(samples=4, batch_size=16)).epoch(0)
    assert count == 20
    batch = next(batches)
    assert batch.features.shape[0] == batch.targets.shape[0] == 64
    np.testing.assert_allclose(batch.weights.reshape(16, 4).sum(axis=1), 0.0, atol=1e-5)
    assert (batch.inputs[:, 0] == START_ID).all()
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # teacher forcing on the sample
    assert (batch.targets != PAD_ID).any(axis=1).all()


def test_greedy_baseline_is_the_reward_of_the_greedy_caption(toy, one_epoch_model):
    model = one_epoch_model
    source = scst_batches(toy, model, ScstConfig(samples=2, batch_size=8, baseline="greedy"))
    batches, _ = source.epoch(0)
    batch = next(batches)
    rewards = source._rewards[0]
    rows = np.random.default_rng([7, 0]).permutation(np.arange(320))[:8]
    greedy = source.rewards(GreedyDecoder(model, 20).search(toy.table.features[rows]), rows)
    np.testing.assert_allclose(batch.weights, rewards - np.repeat(greedy, 2), rtol=1e-5, atol=1e-5)


def test_self_critical_training_raises_the_mean_reward(toy):
    model, evaluator, state = cross_entropy_model(toy)
    config = ScstConfig(enabled=True, epochs=4, samples=4, batch_size=32, learning_rate=1e-3, patience=0)
    state.begin("scst")
    trainer = CaptionTrainer(model, config.train_config(TrainConfig()))
    fit(trainer, evaluator, state, scst_batches(toy, model, config), num_images=320, num_captions=1280,
        progress=False)
    rewards = [h.train_reward for h in state.phase_history]
    assert [h.phase for h in state.history] == ["xe"] * 2 + ["scst"] * 4
    assert rewards[-1] > rewards[0] + 0.1, rewards
    assert state.best_epoch == 1 + int(np.argmax([h.dev_cider for h in state.phase_history]))
    # The greedy decoder of the dev evaluation was traced once for all six epochs of both phases.
    assert evaluator._greedy._search.experimental_get_tracing_count() == 1


def test_scst_dropout_false_scores_the_samples_with_the_policy_that_sampled_them(toy):
    """The sampler runs without dropout; with ``scst.dropout = false`` the update's log-probabilities do too,
    so a step's loss is the advantage-weighted negative log-likelihood of the samples under the model as it
    sampled them. With the default (true) the step applies the model's dropout and the loss differs."""
    model = build_model(ModelConfig(embedding_dim=32, units=64, dropout=0.5, embedding_dropout=0.3), toy.vocab,
                        toy.table.dim, seed=0)
    config = ScstConfig(samples=4, batch_size=16)
    batch = next(scst_batches(toy, model, config).epoch(0)[0])

    def as_sampled() -> float:
        total, count = masked_token_loss(model((batch.features, batch.inputs), training=False), batch.targets,
                                         batch.weights)
        return float(total / count)

    def phase(dropout: bool):
        [phase] = training_phases(config_from_dict(TrainJobConfig, {
            "data": {"captions": "c", "features": "f"},
            "scst": {"enabled": True, "init_from": "b", "dropout": dropout}}))
        return phase

    exact = CaptionTrainer(model, config.train_config(TrainConfig()), dropout=phase(False).dropout)
    expected = as_sampled()
    assert exact.train_step(batch) == pytest.approx(expected, rel=1e-5)  # the loss before the update
    regularised = CaptionTrainer(model, config.train_config(TrainConfig()), dropout=phase(True).dropout)
    expected = as_sampled()
    assert regularised.train_step(batch) != pytest.approx(expected, rel=1e-3)


def test_each_image_is_rewarded_against_its_own_references_whatever_the_feature_table_order(tmp_path):
    """The feature table is kept in the order it was written (extraction's, not the split's): the self-critical
    batches must still pair every image's feature with its references."""
    from toy import write_toy_job_files

    from imgcap.config.model import ModelConfig, TextConfig
    from imgcap.config.training import DataConfig, TrainJobConfig
    from imgcap.data.dataset import prepare_training_data
    from imgcap.model.decoder import build_model
    from imgcap.train.batches import phase_batches
    from imgcap.train.state import training_phases

    files = write_toy_job_files(tmp_path)
    with np.load(files["features"]) as npz:
        order = np.random.default_rng(0).permutation(len(npz["ids"]))
        np.savez(tmp_path / "shuffled.npz", ids=npz["ids"][order], features=npz["features"][order])
    rewards = []
    for features in (files["features"], str(tmp_path / "shuffled.npz")):
        job = TrainJobConfig(data=DataConfig(**{**files, "features": features}), text=TextConfig(min_count=1),
                             model=ModelConfig(embedding_dim=8, units=16), scst=ScstConfig(enabled=True, batch_size=16))
        data = prepare_training_data(job.data, job.text)
        model = build_model(job.model, data.vocab, data.features.dim, seed=0)
        batches, _ = phase_batches(training_phases(job)[-1], job, data, model).epoch(0)
        batch = next(batches)
        rewards.append((batch.features, batch.targets, batch.weights))
    np.testing.assert_array_equal(rewards[0][0], rewards[1][0])  # the same images in the same batch,
    np.testing.assert_array_equal(rewards[0][1], rewards[1][1])  # the same samples,
    np.testing.assert_allclose(rewards[0][2], rewards[1][2])  # the same advantages

