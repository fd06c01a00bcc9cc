"""Caption generation on batches of images: greedy and beam search, and sampling (self-critical training).

Both decoders are incremental: the decoder state (LSTM h/c) is carried from step to step and only the newest
token is fed, so a caption of n words costs n LSTM steps, not n re-runs of the prefix; what a step reads of the
image (a merge model's projected vector, an attention model's projected regions) is computed once per image.
Each runs as one compiled TensorFlow graph per batch. `<pad>`, `<unk>` and `<start>` are never emitted.
With ``no_repeat_ngram_size = n`` greedy and beam search never repeat a sequence of n words within a caption
(self-critical training makes captions such as "a white dog and a white dog are playing" more likely).

A decoder works with anything that has the `CaptionModel` decoding interface: `initial_state(features) ->
(image, state)` and `step(tokens, image, state) -> (logits, state)`, each a nest of tensors whose first
dimension is the batch. The search reorders `state` as hypotheses are kept or dropped but never `image`: the
hypotheses of an image stay in that image's rows, so its rows of `image` stay right without being gathered
(for attention, the regions are the bulk of the memory a step touches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import tensorflow as tf

from imgcap.config.model import DecodeConfig
from imgcap.data.text import END_ID, PAD_ID, START_ID, UNK_ID

_NEG = -1e9  # "impossible" score; finite so that sums of impossible scores never turn into NaN


class StepModel(Protocol):
    vocab_size: int
    feature_dim: int

    def initial_state(self, features: tf.Tensor): ...

    def step(self, tokens: tf.Tensor, image, state): ...


@dataclass(frozen=True)
class DecodedCaptions:
    """Token ids per image (up to and without `<end>`) and each caption's log-probability score."""

    tokens: list[list[int]]
    scores: np.ndarray


def _banned_bias(vocab_size: int) -> tf.Tensor:
    bias = np.zeros(vocab_size, dtype=np.float32)
    bias[[PAD_ID, UNK_ID, START_ID]] = _NEG
    return tf.constant(bias)


def _strip(rows: np.ndarray) -> list[list[int]]:
    out = []
    for row in rows:
        ids = []
        for i in row.tolist():
            if i in (END_ID, PAD_ID):
                break
            ids.append(i)
        out.append(ids)
    return out


def _repeat_ban(history: tf.Tensor, t: tf.Tensor, vocab_size: int, n: int) -> tf.Tensor:
    """A [N, V] bias that forbids, in each row, every word that would complete an n-gram the row's caption
    already holds: `history` is [N, L] word ids, its first `t` columns written (the words of steps 0..t-1).

    Row r's last n-1 words are compared with every window of n-1 words that starts early enough for the word
    after it to be written (start i < t - n + 1); the word after each match is banned. Windows past `t` are
    masked, so unwritten columns never match, and before n-1 words exist nothing is banned."""
    rows, length = tf.shape(history)[0], history.shape[1]
    starts = length - n + 1  # i = 0 .. L - n: a window's words are i .. i + n - 2, the word after it i + n - 1
    match = tf.range(starts)[None, :] < t - n + 1
    for j in range(n - 1):  # static: n is a config value
        last = tf.gather(history, tf.maximum(t - n + 1 + j, 0), axis=1)  # the row's (j+1)-th of its last n-1
        match &= tf.equal(history[:, j : j + starts], last[:, None])
    where = tf.where(match)  # [M, 2]: (row, window start)
    banned = tf.gather_nd(history[:, n - 1 :], where)
    # A word banned twice gets twice the impossible score: still finite, and as impossible.
    return tf.scatter_nd(tf.stack([where[:, 0], tf.cast(banned, tf.int64)], axis=1),
                         tf.fill(tf.shape(banned), _NEG), tf.cast(tf.stack([rows, vocab_size]), tf.int64))


class _Decoder:
    """Shared batching: split images into batches, run the compiled search, collect tokens and scores."""

    def __init__(self, model: StepModel, max_length: int = 30, batch_size: int = 256,
                 no_repeat_ngram_size: int = 0) -> None:
        if max_length < 1 or batch_size < 1:
            raise ValueError("max_length and batch_size must be >= 1")
        if no_repeat_ngram_size < 0 or no_repeat_ngram_size == 1:
            raise ValueError(f"no_repeat_ngram_size must be 0 (off) or >= 2, got {no_repeat_ngram_size}")
        self.model, self.max_length, self.batch_size = model, max_length, batch_size
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self._banned = _banned_bias(model.vocab_size)
        self._search = tf.function(self._search_graph, input_signature=[
            tf.TensorSpec([None, model.feature_dim], tf.float32)], reduce_retracing=True)

    def _search_graph(self, features: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError

    def decode(self, features: np.ndarray) -> DecodedCaptions:
        """Captions for a [N, D] feature matrix, as token ids and log-probability scores."""
        features = _check_features(features, self.model.feature_dim)
        tokens, scores = [], []
        for start in range(0, len(features), self.batch_size):
            ids, score = self._search(tf.constant(features[start : start + self.batch_size]))
            tokens.extend(_strip(ids.numpy()))
            scores.append(score.numpy())
        return DecodedCaptions(tokens, np.concatenate(scores) if scores else np.zeros(0, np.float32))

    def search(self, features: np.ndarray) -> np.ndarray:
        """The captions of one batch as a [N, L] id matrix: each row up to and with `<end>`, then `<pad>`
        (what self-critical training scores and trains on)."""
        return self._search(tf.constant(_check_features(features, self.model.feature_dim)))[0].numpy()


def _check_features(features: np.ndarray, dim: int) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[1] != dim:
        raise ValueError(f"expected features of shape [N, {dim}], got {features.shape}")
    return features


class GreedyDecoder(_Decoder):
    """Takes the most likely word at every step."""

    def _search_graph(self, features: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch = tf.shape(features)[0]
        image, state = self.model.initial_state(features)
        tokens = tf.fill([batch], START_ID)
        finished = tf.zeros([batch], tf.bool)
        score = tf.zeros([batch], tf.float32)
        out = tf.TensorArray(tf.int32, size=self.max_length, element_shape=tf.TensorShape([None]))
        n = self.no_repeat_ngram_size
        history = tf.zeros([batch, self.max_length], tf.int32)  # the words so far: written and read only with the ban
        positions = tf.range(self.max_length)[None, :]
        for t in tf.range(self.max_length):
            logits, state = self.model.step(tokens, image, state)
            log_probs = tf.nn.log_softmax(logits + self._banned)
            if n:  # after log_softmax: a caption's score stays the model's log-probability of its words
                log_probs += _repeat_ban(history, t, self.model.vocab_size, n)
            tokens = tf.argmax(log_probs, axis=-1, output_type=tf.int32)
            step_score = tf.reduce_max(log_probs, axis=-1)
            score += tf.where(finished, 0.0, step_score)
            tokens = tf.where(finished, PAD_ID, tokens)
            out = out.write(t, tokens)
            if n:
                history = tf.where(positions == t, tokens[:, None], history)
            finished = finished | tf.equal(tokens, END_ID)
            if tf.reduce_all(finished):
                break
        ids = tf.transpose(out.stack())
        return ids, score


class BeamSearchDecoder(_Decoder):
    """Keeps the `beam_width` most likely partial captions per image at every step.

    Partial captions are ranked by total log-probability. Once every beam of every image has emitted `<end>`
    (or `max_length` is reached) the best of each image's beams is chosen by
    ``log p / length ** length_penalty``: 0 keeps plain log-probability, larger values favour longer captions.
    With ``beam_width=1`` this is exactly greedy decoding.
    """

    def __init__(self, model: StepModel, beam_width: int = 3, max_length: int = 30,
                 batch_size: int = 256, length_penalty: float = 0.0, no_repeat_ngram_size: int = 0) -> None:
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        self.beam_width, self.length_penalty = beam_width, length_penalty
        super().__init__(model, max_length, batch_size, no_repeat_ngram_size)

    def _search_graph(self, features: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        k, v, length = self.beam_width, self.model.vocab_size, self.max_length
        batch = tf.shape(features)[0]
        # Beam j of image b is row b * k + j, of `image` too: repeated once here, never gathered below.
        image, state = tf.nest.map_structure(lambda s: tf.repeat(s, k, axis=0), self.model.initial_state(features))
        tokens = tf.fill([batch * k], START_ID)
        # Only the first beam is alive at the start, so the first step expands one hypothesis, not k copies.
        scores = tf.tile(tf.constant([[0.0] + [_NEG] * (k - 1)]), [batch, 1])
        finished = tf.zeros([batch, k], tf.bool)
        lengths = tf.zeros([batch, k], tf.int32)
        history = tf.zeros([batch, k, length], tf.int32)
        # A finished beam may only be extended by <pad>, at no cost: its score stays frozen.
        pad_only = tf.constant(np.where(np.arange(v) == PAD_ID, 0.0, _NEG).astype(np.float32))
        positions = tf.range(length)[None, None, :]
        beam_offsets = (tf.range(batch) * k)[:, None]
        for t in tf.range(length):
            logits, state = self.model.step(tokens, image, state)
            log_probs = tf.nn.log_softmax(logits + self._banned)
            if self.no_repeat_ngram_size:  # as in greedy; before the finished beams' <pad>-only override
                log_probs += _repeat_ban(tf.reshape(history, [batch * k, length]), t, v, self.no_repeat_ngram_size)
            log_probs = tf.where(finished[..., None], pad_only, tf.reshape(log_probs, [batch, k, v]))
            candidates = tf.reshape(scores[..., None] + log_probs, [batch, k * v])
            scores, best = tf.math.top_k(candidates, k=k)
            parent, word = best // v, best % v
            history = tf.gather(history, parent, batch_dims=1)
            history = tf.where(positions == t, word[..., None], history)
            parent_finished = tf.gather(finished, parent, batch_dims=1)
            lengths = tf.gather(lengths, parent, batch_dims=1) + tf.cast(~parent_finished, tf.int32)
            finished = parent_finished | tf.equal(word, END_ID)
            rows = tf.reshape(parent + beam_offsets, [-1])
            state = tf.nest.map_structure(lambda s: tf.gather(s, rows), state)
            tokens = tf.reshape(word, [-1])
            if tf.reduce_all(finished):
                break
        ranked = scores
        if self.length_penalty > 0:
            ranked = scores / tf.pow(tf.cast(tf.maximum(lengths, 1), tf.float32), self.length_penalty)
        choice = tf.argmax(ranked, axis=-1, output_type=tf.int32)
        return tf.gather(history, choice, batch_dims=1), tf.gather(scores, choice, batch_dims=1)


class CaptionSampler:
    """Draws `samples` captions per image from the model's next-word distribution at `temperature`.

    The sampling counterpart of `GreedyDecoder` (self-critical training's policy): incremental, one compiled
    graph per batch, the same banned tokens, `<pad>` after `<end>`. Rows come image-major: image b's samples
    are rows ``b * samples .. b * samples + samples - 1``. The randomness is stateless, drawn from the seed
    passed in (one per batch and step), so a batch is reproducible and workers never share a stream. As the
    temperature goes to 0 every sample becomes the greedy caption.
    """

    def __init__(self, model: StepModel, samples: int = 5, temperature: float = 1.0, max_length: int = 20) -> None:
        if samples < 1 or max_length < 1 or temperature <= 0:
            raise ValueError("samples and max_length must be >= 1 and temperature > 0")
        self.model, self.samples, self.temperature, self.max_length = model, samples, temperature, max_length
        self._banned = _banned_bias(model.vocab_size)
        self._sample = tf.function(self._sample_graph, input_signature=[
            tf.TensorSpec([None, model.feature_dim], tf.float32), tf.TensorSpec([2], tf.int64)])

    def _sample_graph(self, features: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        rows = tf.shape(features)[0] * self.samples
        # image b's samples are rows b * samples ...: its image part is computed once and repeated
        image, state = tf.nest.map_structure(lambda s: tf.repeat(s, self.samples, axis=0),
                                             self.model.initial_state(features))
        tokens = tf.fill([rows], START_ID)
        finished = tf.zeros([rows], tf.bool)
        out = tf.TensorArray(tf.int32, size=self.max_length, element_shape=tf.TensorShape([None]))
        for t in tf.range(self.max_length):
            logits, state = self.model.step(tokens, image, state)
            # log_softmax first: the ensemble's step already returns log-probabilities, a model's returns logits
            scaled = tf.nn.log_softmax(logits + self._banned) / self.temperature
            step_seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(t, tf.int64))
            tokens = tf.cast(tf.random.stateless_categorical(scaled, 1, step_seed)[:, 0], tf.int32)
            tokens = tf.where(finished, PAD_ID, tokens)
            out = out.write(t, tokens)
            finished = finished | tf.equal(tokens, END_ID)
            if tf.reduce_all(finished):
                break
        return tf.transpose(out.stack())

    def sample(self, features: np.ndarray, seed: np.ndarray) -> np.ndarray:
        """[N * samples, L] token ids (each row up to and with `<end>`, then `<pad>`) for [N, D] features;
        `seed`: two integers."""
        features = _check_features(features, self.model.feature_dim)
        return self._sample(tf.constant(features), tf.constant(np.asarray(seed, dtype=np.int64))).numpy()


def make_decoder(model: StepModel, config: DecodeConfig) -> GreedyDecoder | BeamSearchDecoder:
    """The decoder a `DecodeConfig` asks for: greedy at beam width 1, beam search otherwise."""
    if config.beam_width == 1:
        return GreedyDecoder(model, config.max_length, config.batch_size, config.no_repeat_ngram_size)
    return BeamSearchDecoder(model, config.beam_width, config.max_length, config.batch_size,
                             config.length_penalty, config.no_repeat_ngram_size)
