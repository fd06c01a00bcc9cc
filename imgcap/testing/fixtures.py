"""Fixtures shared by the tests and the benchmarks: an untrained bundle, synthetic JPEGs, free ports.

`untrained_bundle` imports TensorFlow-backed modules inside the function on purpose: importing the fixtures
must not load TensorFlow in a benchmark driver that never builds a model."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
from PIL import Image


def untrained_bundle(directory: str | Path, architecture: str = "merge") -> str:
    """A bundle of a real but untrained decoder over `thumbnail` features (no CNN weights needed): it captions
    deterministically, fast, from any image. For the tests and the fault benchmarks, where what is measured is
    that every image gets its row, not what the caption says. "attention" reads the thumbnail's 16x16 grid of
    RGB cells as 256 regions (pooling "none"). Returns the bundle directory."""
    from imgcap.config.model import DecodeConfig, ModelConfig, TextConfig
    from imgcap.data.text import Vocabulary
    from imgcap.model.bundle import CaptionBundle
    from imgcap.model.decoder import build_model
    from imgcap.vision.spec import EmbeddingSpec

    spec = EmbeddingSpec("thumbnail", "none" if architecture == "attention" else "default")
    vocab = Vocabulary.build([["a", "red", "dog"], ["a", "blue", "cat"]], 1, "standard")
    config = ModelConfig(architecture=architecture, embedding_dim=16, units=16, attention_dim=8)  # type: ignore[arg-type]
    model = build_model(config, vocab, 768, seed=0, regions=spec.regions)
    bundle = CaptionBundle(model, vocab, TextConfig(min_count=1), DecodeConfig(beam_width=2, max_length=6), spec)
    return str(bundle.save(directory))


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct ports on 127.0.0.1 free right now (held open together so they differ, then released
    for the server that is about to bind them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def synthetic_jpegs(distinct: int = 200, size: tuple[int, int] = (320, 240)) -> list[bytes]:
    """`distinct` different smooth pictures of `size` (width, height) as JPEG bytes, always the same ones."""
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(distinct):
        base = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(base).resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=85)
        encoded.append(buffer.getvalue())
    return encoded
