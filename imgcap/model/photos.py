"""Caption a few photo files in this process with a bundle: the same imaging, CNN and decoder as the bulk job.

The bundle and the CNN (TensorFlow) are imported inside `caption_photos` on purpose, after `import_tensorflow`,
so TensorFlow starts without its CPU banners.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgcap.config.model import DecodeConfig
from imgcap.runtime.logs import import_tensorflow
from imgcap.vision.imaging import ImageError, load_pixels

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class PhotoCaption:
    """The caption of one photo file, or why it has none."""
    path: str
    caption: str | None
    error: str | None = None


def caption_photos(bundle_path: str, photos: list[str], weights: str | None = "imagenet",
                   decode: DecodeConfig | None = None) -> list[PhotoCaption]:
    """Caption a few photo files in this process, with the same stages as the job: pixels and CNN as the
    bundle records (`EmbeddingSpec`), then the bundle's decoder. For bulk work use the Ray job.
    `weights` are the backbone's: "imagenet", a weights file, or None."""
    import_tensorflow()
    from imgcap.model.bundle import load_bundle
    from imgcap.vision.embedder import CnnEmbedder

    bundle = load_bundle(bundle_path)
    if bundle.embedding is None:
        raise ValueError(f"{bundle_path} does not record the backbone its features came from "
                         "(data.backbone was not set when it was trained)")
    options = bundle.embedding.imaging()
    results: list[PhotoCaption | None] = []
    pixels = []
    for photo in photos:
        try:
            pixels.append(load_pixels(Path(photo).read_bytes(), options))
            results.append(None)
        except (OSError, ImageError) as exc:
            results.append(PhotoCaption(photo, None, str(exc)))
    if pixels:
        features = CnnEmbedder(bundle.embedding, weights).embed(np.stack(pixels))
        captions = iter(bundle.caption(features, decode))
        results = [r if r is not None else PhotoCaption(photo, " ".join(next(captions)))
                   for r, photo in zip(results, photos)]
    return results  # type: ignore[return-value]
