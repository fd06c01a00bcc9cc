"""Test helpers: real image files made with Pillow, and the bad inputs extraction must survive."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from imgcap.vision.imaging import ImagingOptions, load_pixels

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pattern(width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """A smooth colour pattern (JPEG keeps it close) that differs per seed."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.02, 0.2, 3)
    rgb = np.stack([128 + 100 * np.sin(a * x), 128 + 100 * np.cos(b * y), 128 + 100 * np.sin(c * (x + y))], -1)
    return rgb.clip(0, 255).astype(np.uint8)


def jpeg_bytes(seed: int = 0, width: int = 64, height: int = 48, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern(width, height, seed)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_jpegs(directory: Path, count: int, prefix: str = "img", start: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = directory / f"{prefix}{i:04d}.jpg"
        path.write_bytes(jpeg_bytes(seed=i))
        paths.append(path)
    return paths


def write_bad_inputs(directory: Path) -> dict[str, str]:
    """Every bad-input kind, as real files; returns {image_id: expected error prefix}.

    Unreadable: a dangling symlink named like an image (chmod 000 does not stop root, who may run the tests).
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "zero.jpg").write_bytes(b"")
    (directory / "truncated.jpg").write_bytes(jpeg_bytes(seed=99, width=256, height=256)[:1500])
    (directory / "text.jpg").write_text("this is not an image\n")
    (directory / "dangling.jpg").symlink_to(directory / "does-not-exist.jpg")
    return {"zero": "empty file", "truncated": "corrupt image", "text": "not an image", "dangling": "unreadable"}


def thumbnail(data: bytes) -> np.ndarray:
    """The expected `thumbnail` backbone feature of image bytes, computed without Keras or Ray."""
    pixels = load_pixels(data, ImagingOptions((224, 224))) / 255.0
    return pixels.reshape(16, 14, 16, 14, 3).mean(axis=(1, 3)).reshape(-1)
