"""The training loop (imgcap/train/loop.py): cross-entropy epochs of `fit` on the toy problem, both
architectures (tests/conftest.py `trained_toy`: trained once per session, shared with the decoding and bundle
tests)."""

from imgcap.metrics.evaluate import nltk_corpus_bleu
from imgcap.model.beam import GreedyDecoder


def test_training_lowers_dev_loss_and_beats_chance(trained_toy, toy):
    model, vocab = trained_toy.model, trained_toy.vocab
    losses = [h.dev_loss for h in trained_toy.state.history]
    assert losses[-1] < 0.6 * trained_toy.loss_before and min(losses) < losses[0]
    captions = [vocab.decode(t) for t in GreedyDecoder(model, 20).decode(toy.dev_features).tokens]
    bleu = nltk_corpus_bleu(toy.dev_references, captions)[3]
    shuffled = nltk_corpus_bleu(toy.dev_references[1:] + toy.dev_references[:1], captions)[3]  # other images'
    assert bleu > 0.5 and bleu > shuffled + 0.1
