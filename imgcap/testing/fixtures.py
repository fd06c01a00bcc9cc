"""Fixtures shared by the tests and the benchmarks: an untrained bundle, synthetic JPEGs."""

from __future__ import annotations

from pathlib import Path


def untrained_bundle(directory: str | Path) -> str:
    """A bundle of a real but untrained merge decoder over `thumbnail` features (no CNN weights needed): it
    captions deterministically, fast, from any image. For the tests and the fault benchmarks, where what is
    measured is that every image gets its row, not what the caption says. Returns the bundle directory."""
    from imgcap.config.model import DecodeConfig, ModelConfig, TextConfig
    from imgcap.data.text import Vocabulary
    from imgcap.model.bundle import CaptionBundle
    from imgcap.model.decoder import build_model
    from imgcap.vision.spec import EmbeddingSpec

    vocab = Vocabulary.build([["a", "red", "dog"], ["a", "blue", "cat"]], 1, "standard")
    model = build_model(ModelConfig(embedding_dim=16, units=16), vocab, 768, seed=0)
    bundle = CaptionBundle(model, vocab, TextConfig(min_count=1), DecodeConfig(beam_width=2, max_length=6),
                           EmbeddingSpec("thumbnail"))
    return str(bundle.save(directory))
