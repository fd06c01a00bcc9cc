"""Self-critical training: the CIDEr-D reward, sampling, the training state and checkpoints, a short run.

The reward is checked against coco-caption's own scorer (pycocoevalcap, pure Python) on the same references;
the training runs are real TensorFlow on the toy problem of `tests/toy.py`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _imaging import SHARED
from toy import make_toy_training, write_toy_job_files

from imgcap.config.loader import ConfigError, config_from_dict
from imgcap.config.model import DecodeConfig, ModelConfig
from imgcap.config.training import ScstConfig, TrainConfig, TrainJobConfig
from imgcap.data.dataset import prepare_training_data, tokenize_corpus
from imgcap.data.text import END_ID, PAD_ID, START_ID
from imgcap.metrics.cider import CiderD
from imgcap.metrics.evaluate import evaluate_captions
from imgcap.model.beam import CaptionSampler, GreedyDecoder
from imgcap.model.decoder import build_model
from imgcap.train.batches import CaptionBatches
from imgcap.train.evaluation import DevEvaluator
from imgcap.train.local import train_captioner
from imgcap.train.loop import fit
from imgcap.train.losses import masked_token_loss
from imgcap.train.scst import SelfCriticalBatches
from imgcap.train.state import (
    EpochMetrics,
    TrainingState,
    find_latest_checkpoint,
    training_phases,
)
from imgcap.train.trainer import CaptionTrainer, write_checkpoint

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


def test_cider_d_on_flickr8k_dev_matches_coco_caption(flickr8k_dev_references):
    refs = flickr8k_dev_references[:200]
    rng = np.random.default_rng(0)
    hypotheses = [refs[(k * 7) % len(refs)][k % 5][: rng.integers(1, 15)] for k in range(len(refs))]
    expected = coco_cider([[" ".join(r) for r in rs] for rs in refs], [" ".join(h) for h in hypotheses])
    np.testing.assert_allclose(CiderD(refs).score_captions(hypotheses), expected, rtol=1e-10, atol=1e-12)


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


@pytest.fixture(scope="module")
def toy():
    t = make_toy_training()
    return t.vocab, t.table, t.train, t.train_references, (t.dev, t.table.features, t.dev_features, t.dev_references)


def cross_entropy_model(toy, epochs: int = 2):
    """A toy model after a short cross-entropy phase (captions right in kind, not yet in detail)."""
    vocab, table, train, _, evaluator_args = toy
    model = build_model(ModelConfig(embedding_dim=32, units=64, dropout=0.1), vocab, table.dim, seed=0)
    evaluator = DevEvaluator(model, vocab, *evaluator_args)
    state = TrainingState("xe")
    trainer = CaptionTrainer(model, TrainConfig(epochs=epochs, batch_size=32, learning_rate=3e-3, patience=0,
                                                select_by="loss"))
    batches = CaptionBatches(train, table.features, 32, lambda epoch: np.random.default_rng(epoch))
    fit(trainer, evaluator, state, batches, num_images=320, num_captions=len(train), progress=False)
    return model, evaluator, state


def test_sampling_at_temperature_near_zero_gives_the_greedy_caption(toy):
    model, *_ = cross_entropy_model(toy)
    features = toy[1].features[:64]
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


def scst_batches(toy, model, config: ScstConfig) -> SelfCriticalBatches:
    vocab, table, _, train_refs, _ = toy
    return SelfCriticalBatches(model, vocab, CiderD(train_refs), table.features, np.arange(320), config,
                               config.batch_size, lambda epoch: np.random.default_rng([7, epoch]))


def test_mean_baseline_advantages_sum_to_zero_per_image_and_targets_are_the_samples(toy):
    model, *_ = cross_entropy_model(toy, epochs=1)
    batches, count = scst_batches(toy, model, ScstConfig(samples=4, batch_size=16)).epoch(0)
    assert count == 20
    batch = next(batches)
    assert batch.features.shape[0] == batch.targets.shape[0] == 64
    np.testing.assert_allclose(batch.weights.reshape(16, 4).sum(axis=1), 0.0, atol=1e-5)
    assert (batch.inputs[:, 0] == START_ID).all()
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # teacher forcing on the sample
    assert (batch.targets != PAD_ID).any(axis=1).all()


def test_greedy_baseline_is_the_reward_of_the_greedy_caption(toy):
    model, *_ = cross_entropy_model(toy, epochs=1)
    source = scst_batches(toy, model, ScstConfig(samples=2, batch_size=8, baseline="greedy"))
    batches, _ = source.epoch(0)
    batch = next(batches)
    rewards = source._rewards[0]
    rows = np.random.default_rng([7, 0]).permutation(np.arange(320))[:8]
    greedy = source.rewards(GreedyDecoder(model, 20).search(toy[1].features[rows]), rows)
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


def test_checkpoint_restores_model_optimizer_average_and_best_weights(toy, tmp_path):
    vocab, table, train, _, evaluator_args = toy
    config = TrainConfig(epochs=2, batch_size=32, learning_rate=3e-3, patience=0, select_by="loss", weight_ema=0.9)

    def trainer_for(seed: int) -> CaptionTrainer:
        model = build_model(ModelConfig(embedding_dim=32, units=64, dropout=0.1), vocab, table.dim, seed=seed)
        return CaptionTrainer(model, config)

    trainer = trainer_for(0)
    state = fit(trainer, DevEvaluator(trainer.model, vocab, *evaluator_args), TrainingState("xe"),
                CaptionBatches(train, table.features, 32, lambda epoch: np.random.default_rng(epoch)),
                num_images=320, num_captions=len(train), progress=False)
    directory = tmp_path / "run" / "checkpoint"
    directory.mkdir(parents=True)
    write_checkpoint(directory, trainer, state, vocab, {"note": "test"})
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


def test_scst_dropout_false_scores_the_samples_with_the_policy_that_sampled_them(toy):
    """The sampler runs without dropout; with ``scst.dropout = false`` the update's log-probabilities do too,
    so a step's loss is the advantage-weighted negative log-likelihood of the samples under the model as it
    sampled them. With the default (true) the step applies the model's dropout and the loss differs."""
    vocab, table, *_ = toy
    model = build_model(ModelConfig(embedding_dim=32, units=64, dropout=0.5, embedding_dropout=0.3), vocab,
                        table.dim, seed=0)
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


def metrics(phase: str, epoch: int, bleu: float) -> EpochMetrics:
    return EpochMetrics(phase, epoch, 1.0, 2.0, bleu, 0.5, 1e-3, 1.0, 10.0, 50.0, 5)


def test_training_state_decides_stops_and_phases():
    job = config_from_dict(TrainJobConfig, {"data": {"captions": "c", "features": "f"},
                                            "train": {"epochs": 5, "patience": 2},
                                            "scst": {"enabled": True, "epochs": 3, "select_by": "bleu"}})
    phases = training_phases(job)
    assert [p.name for p in phases] == ["xe", "scst"] and phases[1].config.label_smoothing == 0
    assert phases[0].dropout and phases[1].dropout  # scst.dropout defaults to true
    state = TrainingState("xe")
    for epoch, bleu in enumerate([0.1, 0.2, 0.15, 0.18], 1):
        improved = state.record(metrics("xe", epoch, bleu), "bleu")
        assert improved == (epoch <= 2)
    assert state.best_epoch == 2 and state.stops_early(phases[0].config) and state.phase_done(phases[0].config)
    assert not state.finished(phases)  # the self-critical phase is still to come
    state.begin("scst")
    assert (state.epoch, state.best_epoch) == (0, 0) and len(state.history) == 4
    for epoch in range(1, 4):
        state.record(metrics("scst", epoch, 0.1 + epoch / 100), "bleu")
    assert state.finished(phases) and state.best_epoch == 3
    assert TrainingState.from_meta(json.loads(json.dumps(state.to_meta()))) == state
    assert state.position() == (1, 3) and TrainingState("xe", 9).position() < state.position()


def test_scst_config_is_checked_at_load():
    with pytest.raises(ConfigError, match=r"samples = 1 with baseline = \"mean\""):
        ScstConfig(samples=1)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        ScstConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="scst.select_by"):
        config_from_dict(TrainJobConfig, {"data": {"captions": "c", "features": "f"}, "scst": {"select_by": "loss"}})
    assert [p.name for p in training_phases(config_from_dict(TrainJobConfig, {
        "data": {"captions": "c", "features": "f"}, "scst": {"enabled": True, "init_from": "b"}}))] == ["scst"]


@pytest.fixture(scope="module")
def toy_job_files(tmp_path_factory):
    return write_toy_job_files(tmp_path_factory.mktemp("scst_toy"))


def toy_job(files, output_dir, **tables) -> TrainJobConfig:
    table = {"data": dict(files), "output_dir": str(output_dir), "text": {"min_count": 1, "max_length": 20},
             "model": {"embedding_dim": 32, "units": 64, "dropout": 0.1},
             "train": {"epochs": 2, "batch_size": 32, "learning_rate": 3e-3, "patience": 0},
             "decode": {"beam_width": 1, "max_length": 20}}
    for name, values in tables.items():
        table[name] = {**table.get(name, {}), **values}
    return config_from_dict(TrainJobConfig, table)


def test_train_job_runs_both_phases_and_starts_from_a_bundle(toy_job_files, tmp_path):
    from imgcap.model.bundle import load_bundle

    scst = {"enabled": True, "epochs": 2, "samples": 3, "batch_size": 30, "learning_rate": 1e-3}
    both = train_captioner(toy_job(toy_job_files, tmp_path / "both", scst=scst), progress=False)
    assert [(h.phase, h.epoch) for h in both.history] == [("xe", 1), ("xe", 2), ("scst", 1), ("scst", 2)]
    bundle = load_bundle(both.bundle_path)
    assert bundle.provenance["phases"] == ["xe", "scst"] and bundle.provenance["phase"] == "scst"
    assert all(h["train_reward"] > 0 for h in bundle.provenance["history"][2:])

    xe_bundle = train_captioner(toy_job(toy_job_files, tmp_path / "xe"), progress=False).bundle_path
    started = train_captioner(toy_job(toy_job_files, tmp_path / "from_bundle",
                                      scst={**scst, "init_from": str(xe_bundle)}), progress=False)
    assert [h.phase for h in started.history] == ["scst", "scst"]
    assert load_bundle(started.bundle_path).provenance["init_from"] == str(xe_bundle)
    with pytest.raises(ConfigError, match=r"model.units is 32 but scst.init_from .* was trained with 64"):
        train_captioner(toy_job(toy_job_files, tmp_path / "bad", model={"units": 32},
                                scst={**scst, "init_from": str(xe_bundle)}), progress=False)
    with pytest.raises(ConfigError, match="neither a bundle"):
        train_captioner(toy_job(toy_job_files, tmp_path / "bad", scst={**scst, "init_from": str(tmp_path)}),
                        progress=False)


def test_dev_report_scores_the_bundles_own_decoding(toy_job_files, tmp_path):
    """dev_report.json holds the scores of the captions the bundle makes with its decoding (beam-3 here), not
    of the greedy captions the epochs' dev evaluation makes."""
    from imgcap.model.bundle import load_bundle

    config = toy_job(toy_job_files, tmp_path / "beam", decode={"beam_width": 3, "length_penalty": 1.0})
    train_captioner(config, progress=False)
    bundle = load_bundle(tmp_path / "beam" / "bundle")
    data = prepare_training_data(config.data, config.text, bundle.vocab)
    dev = data.features.select(data.dev_ids).features
    beam, greedy = bundle.caption(dev), bundle.caption(dev, DecodeConfig(beam_width=1, max_length=20))
    assert beam != greedy  # else this test could not tell the two apart

    def bleu(captions: list[list[str]]) -> list[float]:
        return evaluate_captions(data.dev_references, dict(zip(data.dev_ids, captions)), split="dev",
                                 text_mode="standard", decoding="", coco=False).nltk_bleu

    report = json.loads((tmp_path / "beam" / "dev_report.json").read_text())
    assert report["decoding"] == "beam-3 (length penalty 1)"
    assert report["nltk_bleu"] == pytest.approx(bleu(beam), abs=1e-12)
