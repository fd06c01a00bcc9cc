"""The training step, its optimizer and checkpoints (imgcap/train/trainer.py): the sampled softmax, the moving
average of the weights, a checkpoint restoring everything; real TensorFlow on the toy problem of tests/toy.py."""

import json

import numpy as np
import pytest
from toy import dev_loss, fit_toy

from imgcap.config.model import ModelConfig
from imgcap.config.training import TrainConfig
from imgcap.data.dataset import iterate_batches
from imgcap.metrics.evaluate import nltk_corpus_bleu
from imgcap.model.beam import GreedyDecoder
from imgcap.model.decoder import CaptionModel, build_model
from imgcap.train.batches import CaptionBatches
from imgcap.train.evaluation import DevEvaluator
from imgcap.train.loop import fit
from imgcap.train.state import TrainingState, find_latest_checkpoint
from imgcap.train.trainer import CaptionTrainer, write_checkpoint


def test_sampled_softmax_training_lowers_the_full_softmax_dev_loss(toy):
    config = TrainConfig(epochs=6, batch_size=32, learning_rate=3e-3, patience=0, select_by="loss",
                         sampled_softmax=len(toy.vocab) // 3)
    model = build_model(ModelConfig(embedding_dim=32, units=64, dropout=0.1), toy.vocab, toy.table.dim, seed=0)
    before = dev_loss(model, toy)  # always the full softmax
    result, _ = fit_toy(CaptionTrainer(model, config), toy)
    assert result.history[-1].dev_loss < 0.6 * before
    captions = [toy.vocab.decode(t) for t in GreedyDecoder(model, 20).decode(toy.dev_features).tokens]
    assert nltk_corpus_bleu(toy.dev_references, captions)[3] > 0.5


def test_sampled_softmax_must_be_smaller_than_the_vocabulary():
    model = CaptionModel(ModelConfig(units=8, embedding_dim=4), vocab_size=12, feature_dim=3)
    with pytest.raises(ValueError, match=r"sampled_softmax = 12 must be smaller than the vocabulary \(12 words\)"):
        CaptionTrainer(model, TrainConfig(sampled_softmax=12))


def test_weight_ema_evaluates_and_keeps_the_moving_average(toy):
    decay = 0.8
    model = build_model(ModelConfig(embedding_dim=32, units=64, dropout=0.1), toy.vocab, toy.table.dim, seed=0)
    trainer = CaptionTrainer(model, TrainConfig(epochs=4, batch_size=32, learning_rate=3e-3, patience=0,
                                                select_by="loss", weight_ema=decay))
    before = dev_loss(model, toy)
    average = None
    for batch in list(iterate_batches(toy.train, toy.table.features, 32))[:3]:
        trainer.train_step(batch)
        weights = [v.numpy() for v in model.trainable_variables]
        average = weights if average is None else [decay * a + (1 - decay) * w for a, w in zip(average, weights)]
    trained = model.get_weights()
    with trainer.evaluation_weights():
        for variable, expected in zip(model.trainable_variables, average):
            np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-6)
    for now, then in zip(model.get_weights(), trained):  # the trained weights are back
        np.testing.assert_array_equal(now, then)
    result, _ = fit_toy(trainer, toy)
    assert result.history[-1].dev_loss < 0.6 * before


def test_checkpoint_restores_model_optimizer_average_and_best_weights(toy, tmp_path):
    config = TrainConfig(epochs=2, batch_size=32, learning_rate=3e-3, patience=0, select_by="loss", weight_ema=0.9)

    def trainer_for(seed: int) -> CaptionTrainer:
        model = build_model(ModelConfig(embedding_dim=32, units=64, dropout=0.1), toy.vocab, toy.table.dim,
                            seed=seed)
        return CaptionTrainer(model, config)

    trainer = trainer_for(0)
    evaluator = DevEvaluator(trainer.model, toy.vocab, toy.dev, toy.table.features, toy.dev_features,
                             toy.dev_references)
    state = fit(trainer, evaluator, TrainingState("xe"),
                CaptionBatches(toy.train, toy.table.features, 32, lambda epoch: np.random.default_rng(epoch)),
                num_images=320, num_captions=len(toy.train), progress=False)
    directory = tmp_path / "run" / "checkpoint"
    directory.mkdir(parents=True)
    write_checkpoint(directory, trainer, state, toy.vocab, {"note": "test"})
    other = trainer_for(1)
    other.restore(directory)
    for mine, theirs in zip(trainer.model.get_weights(), other.model.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    assert len(trainer.optimizer.variables) > 2 * len(trainer.model.trainable_variables)  # moments and average
    for mine, theirs in zip(trainer.optimizer.variables, other.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    for mine, theirs in zip(trainer.best_weights, other.best_weights):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    meta = json.loads((directory / "imgcap_checkpoint.json").read_text())
    assert TrainingState.from_meta(meta) == state and meta["note"] == "test"
    assert find_latest_checkpoint(tmp_path) == str(directory)
