"""A small, learnable captioning problem for fast tests: feature vectors that encode caption words.

Each toy image has a colour and an object; its feature vector is the one-hot code of both plus noise, and its
captions name them in several phrasings. A decoder that learns anything beats chance on it within seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcap.data.captions import CaptionCorpus
from imgcap.data.dataset import CaptionExamples, build_examples, tokenize_corpus
from imgcap.data.feature_table import FeatureTable
from imgcap.data.text import Vocabulary

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
OBJECTS = ["dog", "cat", "car", "ball", "bird"]
TEMPLATES = ["a {c} {o}", "a {c} {o} is here", "there is a {c} {o}", "the {o} is {c}", "one {c} {o} outside"]


def make_toy_corpus(num_images: int = 300, seed: int = 0, noise: float = 0.3) -> tuple[CaptionCorpus, FeatureTable]:
    """Captions and matching features for `num_images` toy images (ids toy_00000 ...)."""
    rng = np.random.default_rng(seed)
    dim = len(COLOURS) + len(OBJECTS) + 5
    ids, rows, captions = [], [], {}
    for n in range(num_images):
        c, o = rng.integers(len(COLOURS)), rng.integers(len(OBJECTS))
        vector = rng.normal(0.0, noise, dim).astype(np.float32)
        vector[c] += 1.0
        vector[len(COLOURS) + o] += 1.0
        image_id = f"toy_{n:05d}"
        ids.append(image_id)
        rows.append(vector)
        captions[image_id] = [t.format(c=COLOURS[c], o=OBJECTS[o]) for t in TEMPLATES]
    return CaptionCorpus(captions), FeatureTable(ids, np.stack(rows), [f"toy://{i}" for i in ids])


@dataclass(frozen=True)
class ToyTraining:
    """The toy problem split for training: 320 train and 80 dev images, vocabulary, examples, references."""

    vocab: Vocabulary
    table: FeatureTable
    train: CaptionExamples
    dev: CaptionExamples
    train_references: list[list[list[str]]]
    dev_references: list[list[list[str]]]

    @property
    def dev_features(self) -> np.ndarray:
        return self.table.features[320:]


def make_toy_training() -> ToyTraining:
    corpus, table = make_toy_corpus(400, seed=1)
    train_ids, dev_ids = table.ids[:320], table.ids[320:]
    tokens = tokenize_corpus(corpus, table.ids, "standard")
    vocab = Vocabulary.build([c for i in train_ids for c in tokens[i]], min_count=1)
    rows = table.index()
    return ToyTraining(vocab, table, build_examples({i: tokens[i] for i in train_ids}, rows, vocab, 20),
                       build_examples({i: tokens[i] for i in dev_ids}, rows, vocab, 20),
                       [tokens[i] for i in train_ids], [tokens[i] for i in dev_ids])


def write_toy_job_files(root: Path) -> dict[str, str]:
    """The toy problem (300 images) as a training job reads it: a Flickr8k-style caption file, split files
    (240 train, 60 dev) and an .npz of features; returns the `[data]` paths."""
    corpus, table = make_toy_corpus(300, seed=1)
    with (root / "captions.txt").open("w", encoding="utf-8") as f:
        for image_id in table.ids:
            for n, caption in enumerate(corpus.captions[image_id]):
                f.write(f"{image_id}.jpg#{n}\t{caption}\n")
    (root / "train.txt").write_text("".join(f"{i}.jpg\n" for i in table.ids[:240]), encoding="utf-8")
    (root / "dev.txt").write_text("".join(f"{i}.jpg\n" for i in table.ids[240:]), encoding="utf-8")
    np.savez(root / "features.npz", ids=np.array(table.ids), features=table.features)
    return {"captions": str(root / "captions.txt"), "features": str(root / "features.npz"),
            "train_split": str(root / "train.txt"), "dev_split": str(root / "dev.txt")}



# --- toy decoders trained once per test session (tests/conftest.py: `toy`, `toy_models`, `trained_toy`)

TOY_MODEL = {"embedding_dim": 32, "units": 64, "dropout": 0.1}


def fit_toy(trainer, toy: ToyTraining):
    """Cross-entropy training of `trainer` on the toy problem, as `imgcap train` runs a phase; returns the
    `TrainingState` and the `DevEvaluator` it used."""
    from imgcap.train.batches import CaptionBatches
    from imgcap.train.evaluation import DevEvaluator
    from imgcap.train.loop import fit
    from imgcap.train.state import TrainingState

    evaluator = DevEvaluator(trainer.model, toy.vocab, toy.dev, toy.table.features, toy.dev_features,
                             toy.dev_references)
    stream = np.random.default_rng(0)
    batches = CaptionBatches(toy.train, toy.table.features, trainer.config.batch_size, lambda _: stream)
    state = fit(trainer, evaluator, TrainingState("xe"), batches, num_images=320, num_captions=len(toy.train),
                progress=False)
    return state, evaluator


def dev_loss(model, toy: ToyTraining) -> float:
    """The full-softmax dev loss of `model` on the toy problem."""
    from imgcap.train.evaluation import DevEvaluator

    return DevEvaluator(model, toy.vocab, toy.dev, toy.table.features, toy.dev_features, toy.dev_references).loss()


@dataclass(frozen=True)
class TrainedToy:
    """A toy decoder after 6 cross-entropy epochs: the model, its dev loss before training, the training state."""

    architecture: str
    model: object  # imgcap.model.decoder.CaptionModel
    vocab: Vocabulary
    loss_before: float
    state: object  # imgcap.train.state.TrainingState


class ToyModels:
    """Toy decoders (merge, inject) trained once per session and shared by the tests that only read them
    (decoding, bundles, the training loop's outcome). A test that trains further builds its own model."""

    def __init__(self, toy: ToyTraining) -> None:
        self.toy = toy
        self._trained: dict[str, TrainedToy] = {}

    def trained(self, architecture: str) -> TrainedToy:
        if architecture not in self._trained:
            from imgcap.config.model import ModelConfig
            from imgcap.config.training import TrainConfig
            from imgcap.model.decoder import build_model
            from imgcap.train.trainer import CaptionTrainer

            config = TrainConfig(epochs=6, batch_size=32, learning_rate=3e-3, patience=0, select_by="loss")
            model = build_model(ModelConfig(architecture=architecture, **TOY_MODEL), self.toy.vocab,
                                self.toy.table.dim, seed=0)
            before = dev_loss(model, self.toy)
            state, _ = fit_toy(CaptionTrainer(model, config), self.toy)
            self._trained[architecture] = TrainedToy(architecture, model, self.toy.vocab, before, state)
        return self._trained[architecture]
