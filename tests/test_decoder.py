"""Model, training, greedy/beam decoding and bundles on a small learnable toy problem."""

import numpy as np
import pytest
import tensorflow as tf
from toy import make_toy_training

from imgcap.config.model import DecodeConfig, ModelConfig, TextConfig
from imgcap.config.training import TrainConfig
from imgcap.data.dataset import iterate_batches
from imgcap.data.text import PAD_ID, START_ID, UNK_ID, Vocabulary
from imgcap.metrics.evaluate import nltk_corpus_bleu
from imgcap.model.beam import BeamSearchDecoder, GreedyDecoder, make_decoder
from imgcap.model.bundle import CaptionBundle, combine_bundles, load_bundle
from imgcap.model.decoder import CaptionEnsemble, CaptionModel, build_model
from imgcap.train.batches import CaptionBatches
from imgcap.train.evaluation import DevEvaluator
from imgcap.train.loop import fit
from imgcap.train.state import TrainingState
from imgcap.train.trainer import CaptionTrainer
from imgcap.vision.spec import EmbeddingSpec


@pytest.fixture(scope="module")
def toy():
    t = make_toy_training()
    return t.vocab, t.table.features, t.train, t.dev, t.dev_features, t.dev_references


def fit_toy(trainer: CaptionTrainer, toy) -> tuple[TrainingState, DevEvaluator]:
    """Cross-entropy training of `trainer` on the toy problem, as `imgcap train` runs a phase."""
    vocab, features, train, dev, dev_features, dev_refs = toy
    evaluator = DevEvaluator(trainer.model, vocab, dev, features, dev_features, dev_refs)
    stream = np.random.default_rng(0)
    batches = CaptionBatches(train, features, trainer.config.batch_size, lambda _: stream)
    state = fit(trainer, evaluator, TrainingState("xe"), batches, num_images=320, num_captions=len(train),
                progress=False)
    return state, evaluator


def dev_loss(model: CaptionModel, toy) -> float:
    vocab, features, _, dev, dev_features, dev_refs = toy
    return DevEvaluator(model, vocab, dev, features, dev_features, dev_refs).loss()


@pytest.fixture(scope="module", params=["merge", "inject"])
def trained(request, toy):
    vocab, features, train, dev, dev_features, dev_refs = toy
    config = TrainConfig(epochs=6, batch_size=32, learning_rate=3e-3, patience=0, select_by="loss")
    model = build_model(ModelConfig(architecture=request.param, embedding_dim=32, units=64, dropout=0.1),
                        vocab, features.shape[1], seed=0)
    before = dev_loss(model, toy)
    result, _ = fit_toy(CaptionTrainer(model, config), toy)
    return model, vocab, before, result


def test_bucketed_batches_cover_every_caption_once_with_little_padding(toy):
    _, features, train, *_ = toy
    seen = []
    for batch in iterate_batches(train, features, 16, np.random.default_rng(0)):
        assert batch.inputs.shape == batch.targets.shape and batch.features.shape[0] == batch.inputs.shape[0]
        assert (batch.inputs[:, 0] == START_ID).all()
        # Bucketing: the longest caption of the batch has no padding at all.
        assert (batch.targets[:, -1] != PAD_ID).any()
        seen.append(batch.inputs.shape[0])
    assert sum(seen) == len(train)


def test_training_lowers_dev_loss_and_beats_chance(trained, toy):
    model, vocab, before, result = trained
    _, _, _, _, dev_features, dev_refs = toy
    losses = [h.dev_loss for h in result.history]
    assert losses[-1] < 0.6 * before and min(losses) < losses[0]
    captions = [vocab.decode(t) for t in GreedyDecoder(model, 20).decode(dev_features).tokens]
    bleu = nltk_corpus_bleu(dev_refs, captions)[3]
    shuffled = nltk_corpus_bleu(dev_refs[1:] + dev_refs[:1], captions)[3]  # captions of other images
    assert bleu > 0.5 and bleu > shuffled + 0.1


def test_beam_width_one_equals_greedy(trained, toy):
    model = trained[0]
    features = toy[4]
    greedy = GreedyDecoder(model, 20).decode(features)
    beam = BeamSearchDecoder(model, beam_width=1, max_length=20).decode(features)
    assert beam.tokens == greedy.tokens
    np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5, atol=1e-5)


def test_beam_search_finds_captions_at_least_as_likely_as_greedy(trained, toy):
    model = trained[0]
    features = toy[4]
    greedy = GreedyDecoder(model, 20).decode(features)
    beam = BeamSearchDecoder(model, beam_width=4, max_length=20).decode(features)
    # A wider beam keeps greedy's path among its candidates, so its best total log-probability is never lower.
    assert (beam.scores >= greedy.scores - 1e-4).all()
    assert all(t and UNK_ID not in t and PAD_ID not in t and START_ID not in t for t in beam.tokens)


def test_decoding_matches_teacher_forced_log_probability(trained, toy):
    model = trained[0]
    features = toy[4][:8]
    decoded = GreedyDecoder(model, 20).decode(features)
    for k, ids in enumerate(decoded.tokens):
        sequence = np.array([[START_ID] + ids + [3]], dtype=np.int32)  # ... <end>
        logits = model((features[k : k + 1], sequence[:, :-1]))
        logits = logits.numpy()[0]
        logits[:, [PAD_ID, UNK_ID, START_ID]] = -1e9
        log_probs = tf.nn.log_softmax(logits).numpy()
        expected = sum(log_probs[t, sequence[0, t + 1]] for t in range(len(ids) + 1))
        assert decoded.scores[k] == pytest.approx(expected, abs=1e-3)


def test_length_penalty_prefers_longer_captions(trained, toy):
    model = trained[0]
    features = toy[4]
    plain = BeamSearchDecoder(model, 5, 20, length_penalty=0.0).decode(features)
    long = BeamSearchDecoder(model, 5, 20, length_penalty=2.0).decode(features)
    assert np.mean([len(t) for t in long.tokens]) >= np.mean([len(t) for t in plain.tokens])


def test_bundle_round_trip_captions_identically(trained, toy, tmp_path):
    model, vocab = trained[0], trained[1]
    features = toy[4]
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


def test_ensemble_bundle_of_one_model_twice_captions_like_the_model(trained, toy, tmp_path):
    model, vocab = trained[0], trained[1]
    features = toy[4]
    single = CaptionBundle(model, vocab, TextConfig(), DecodeConfig(beam_width=3, max_length=20))
    twice = combine_bundles([single, single])
    assert isinstance(twice.model, CaptionEnsemble) and len(twice.members) == 2
    # Averaging identical log-probabilities changes nothing: same captions, saved and loaded as an ensemble.
    assert twice.caption(features) == single.caption(features)
    loaded = load_bundle(twice.save(tmp_path / "ens"))
    assert len(loaded.members) == 2 and loaded.caption(features) == single.caption(features)


def test_ensemble_of_different_models_and_vocabulary_check(trained, toy):
    model, vocab = trained[0], trained[1]
    other = build_model(ModelConfig(embedding_dim=8, units=16), vocab, model.feature_dim, seed=3)
    ensemble = CaptionEnsemble([model, other])
    state = ensemble.initial_state(tf.constant(toy[4][:2]))
    log_probs, _ = ensemble.step(tf.constant([START_ID, START_ID]), state)
    expected = (tf.nn.log_softmax(model.step(tf.constant([START_ID] * 2), model.initial_state(toy[4][:2]))[0])
                + tf.nn.log_softmax(other.step(tf.constant([START_ID] * 2), other.initial_state(toy[4][:2]))[0])) / 2
    np.testing.assert_allclose(log_probs.numpy(), expected.numpy(), atol=1e-5)
    a = CaptionBundle(model, vocab, TextConfig(), DecodeConfig())
    b = CaptionBundle(other, Vocabulary.build([["x"] * 12 + [f"w{i}" for i in range(12)]], 1), TextConfig(),
                      DecodeConfig())
    with pytest.raises(ValueError, match="another vocabulary"):
        combine_bundles([a, b])


def test_load_bundle_errors(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="bundle.json is missing"):
        load_bundle(tmp_path)
    model, vocab = trained[0], trained[1]
    CaptionBundle(model, vocab, TextConfig(), DecodeConfig()).save(tmp_path / "b")
    Vocabulary.build([["just", "two"]], 1).save(tmp_path / "b" / "vocab.json")
    with pytest.raises(ValueError, match="vocab.json has 6 words"):
        load_bundle(tmp_path / "b")


def test_decoder_rejects_wrong_feature_size(trained):
    model = trained[0]
    with pytest.raises(ValueError, match=r"expected features of shape \[N, 16\]"):
        make_decoder(model, DecodeConfig(beam_width=1)).decode(np.zeros((2, 5), np.float32))


def test_label_smoothing_loss_is_larger_for_confident_correct_predictions():
    from imgcap.train.losses import masked_token_loss

    logits = tf.constant([[[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]]])
    targets = tf.constant([[1, 0]])  # second token is <pad>: ignored
    plain_sum, count = masked_token_loss(logits, targets)
    smooth_sum, _ = masked_token_loss(logits, targets, label_smoothing=0.1)
    assert float(count) == 1.0
    assert float(plain_sum) == pytest.approx(-float(tf.nn.log_softmax(logits)[0, 0, 1]), rel=1e-5)
    assert float(smooth_sum) < float(plain_sum)  # target 1 is wrong here; smoothing spreads the blame


def test_sampled_softmax_training_lowers_the_full_softmax_dev_loss(toy):
    vocab, features, train, dev, dev_features, dev_refs = toy
    config = TrainConfig(epochs=6, batch_size=32, learning_rate=3e-3, patience=0, select_by="loss",
                         sampled_softmax=len(vocab) // 3)
    model = build_model(ModelConfig(embedding_dim=32, units=64, dropout=0.1), vocab, features.shape[1], seed=0)
    hidden = model.hidden_states((dev_features[:4], tf.fill((4, 3), START_ID)))
    np.testing.assert_allclose(model.classifier(hidden), model((dev_features[:4], tf.fill((4, 3), START_ID))))
    before = dev_loss(model, toy)  # always the full softmax
    result, _ = fit_toy(CaptionTrainer(model, config), toy)
    assert result.history[-1].dev_loss < 0.6 * before
    captions = [vocab.decode(t) for t in GreedyDecoder(model, 20).decode(dev_features).tokens]
    assert nltk_corpus_bleu(dev_refs, captions)[3] > 0.5


def test_sampled_softmax_must_be_smaller_than_the_vocabulary():
    model = CaptionModel(ModelConfig(units=8, embedding_dim=4), vocab_size=12, feature_dim=3)
    with pytest.raises(ValueError, match=r"sampled_softmax = 12 must be smaller than the vocabulary \(12 words\)"):
        CaptionTrainer(model, TrainConfig(sampled_softmax=12))


def test_weight_ema_evaluates_and_keeps_the_moving_average(toy):
    vocab, features, train, dev, dev_features, dev_refs = toy
    decay = 0.8
    model = build_model(ModelConfig(embedding_dim=32, units=64, dropout=0.1), vocab, features.shape[1], seed=0)
    trainer = CaptionTrainer(model, TrainConfig(epochs=4, batch_size=32, learning_rate=3e-3, patience=0,
                                                select_by="loss", weight_ema=decay))
    before = dev_loss(model, toy)
    average = None
    for batch in list(iterate_batches(train, features, 32))[:3]:
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


def test_glove_initialises_known_words(tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("dog 1 2 3 4\ncat -1 -2 -3 -4\n", encoding="utf-8")
    vocab = Vocabulary.build([["dog", "cat", "zebra"]], 1)
    model = build_model(ModelConfig(embedding_dim=4, units=8, glove_path=str(glove), glove_trainable=False),
                        vocab, feature_dim=3)
    table = model.embedding.embeddings.numpy()
    np.testing.assert_array_equal(table[vocab.id("dog")], [1, 2, 3, 4])
    np.testing.assert_array_equal(table[PAD_ID], 0)
    assert not model.embedding.trainable
    with pytest.raises(ValueError, match="4-d vectors but model.embedding_dim is 8"):
        build_model(ModelConfig(embedding_dim=8, units=8, glove_path=str(glove)), vocab, feature_dim=3)


def test_merge_and_inject_have_the_documented_structure():
    vocab_size, dim = 12, 7
    merge = CaptionModel(ModelConfig(units=16, embedding_dim=8), vocab_size, dim)
    inject = CaptionModel(ModelConfig(architecture="inject", units=16, embedding_dim=8), vocab_size, dim)
    features = tf.random.normal((2, dim))
    # merge: the image is not in the LSTM state; inject: it is the LSTM's initial state.
    _, h, c = merge.initial_state(features)
    assert float(tf.reduce_sum(tf.abs(h))) == 0.0 and float(tf.reduce_sum(tf.abs(c))) == 0.0
    _, h, _ = inject.initial_state(features)
    assert float(tf.reduce_sum(tf.abs(h))) > 0.0
    assert merge((features, tf.ones((2, 5), tf.int32))).shape == (2, 5, vocab_size)
