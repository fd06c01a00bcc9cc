"""Synthetic JPEGs shared by the memory benchmarks (a few distinct pictures, cycled to any count)."""

from __future__ import annotations

import io

import numpy as np


def synthetic_jpegs(distinct: int = 200, size: tuple[int, int] = (320, 240)) -> list[bytes]:
    """`distinct` different smooth pictures of `size` (width, height) as JPEG bytes, always the same ones."""
    from PIL import Image

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(distinct):
        base = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(base).resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=85)
        encoded.append(buffer.getvalue())
    return encoded
