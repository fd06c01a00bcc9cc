"""Captioning in this process, for notebooks and services: load a model once, then caption photos.

    import imgcap

    captioner = imgcap.Captioner.load()        # the packaged model, imgcap:flickr8k
    captioner = imgcap.Captioner.load("runs/train/bundle")   # or a bundle directory, an s3:// URI, a name
    for result in captioner.caption(["photo.jpg", open("b.jpg", "rb").read(), pixels]):
        print(result.source, result.caption, result.score, result.error)

Photos go through the same stages as the bulk job (`imgcap.batch.caption`): the imaging and the CNN the
bundle records (`imgcap.vision.spec.EmbeddingSpec`), then the bundle's decoder; one that cannot be read gets
its error instead of a caption, never an exception. For thousands of photos use the Ray job. TensorFlow is
imported inside `Captioner`'s methods on purpose, after `import_tensorflow`, so it starts without its CPU
banners and `import imgcap` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image

from imgcap.config.model import DecodeConfig
from imgcap.io.storage import S3Options
from imgcap.pretrained import DEFAULT_BUNDLE
from imgcap.runtime.logs import import_tensorflow
from imgcap.vision.imaging import ImageError, ImagingOptions, fit_to_input, load_pixels

if TYPE_CHECKING:
    from imgcap.model.bundle import CaptionBundle

Photo = Union[str, Path, bytes, np.ndarray]  # a file path, encoded image bytes, or RGB pixels [H, W, 3]


@dataclass(frozen=True)
class Caption:
    """The caption of one photo, or why it has none."""

    source: str  # the path, or "bytes[k]" / "array[k]" for the k-th photo given in memory
    caption: str | None
    score: float | None = None  # the caption's log-probability under the model
    error: str | None = None


class Captioner:
    """A model bundle and its CNN, loaded once; `caption` takes any number of photos."""

    def __init__(self, bundle: CaptionBundle, weights: str | None = "imagenet",
                 decode: DecodeConfig | None = None) -> None:
        """`bundle` with its backbone's `weights` ("imagenet", a weights file, or None); `decode` overrides
        the decoding the bundle records."""
        if bundle.embedding is None:
            raise ValueError("the bundle does not record the backbone its features came from (it was trained "
                             "without data.backbone): caption its features instead")
        import_tensorflow()
        from imgcap.vision.embedder import CnnEmbedder

        self.bundle, self.embedder = bundle, CnnEmbedder(bundle.embedding, weights)
        self.decoder = bundle.decoder(decode)
        self.imaging: ImagingOptions = bundle.embedding.imaging()

    @classmethod
    def load(cls, bundle_path: str | Path = DEFAULT_BUNDLE, weights: str | None = "imagenet",
             decode: DecodeConfig | None = None, s3: S3Options | None = None) -> Captioner:
        """The bundle at `bundle_path` (a packaged model's name, a directory or a URI; default the packaged
        Flickr8k model), ready to caption (see `__init__`)."""
        import_tensorflow()
        from imgcap.model.bundle import load_bundle

        return cls(load_bundle(bundle_path, s3), weights, decode)

    def _pixels(self, photo: Photo) -> np.ndarray:
        if isinstance(photo, np.ndarray):
            if photo.ndim != 3 or photo.shape[-1] != 3:
                raise ImageError(f"an array photo must be RGB pixels [height, width, 3], got shape {photo.shape}")
            return fit_to_input(Image.fromarray(np.asarray(photo, dtype=np.uint8)), self.imaging)
        data = photo if isinstance(photo, bytes) else Path(photo).read_bytes()
        return load_pixels(data, self.imaging)

    def caption(self, photos: Sequence[Photo], batch_size: int = 32) -> list[Caption]:
        """One `Caption` per photo, in order; `batch_size` photos go through the CNN at a time."""
        results: list[Caption] = []
        for start in range(0, len(photos), batch_size):
            results += self._caption_batch(photos[start:start + batch_size], start)
        return results

    def _caption_batch(self, photos: Sequence[Photo], offset: int) -> list[Caption]:
        sources = [p if isinstance(p, (str, Path)) else f"{'bytes' if isinstance(p, bytes) else 'array'}"
                   f"[{offset + k}]" for k, p in enumerate(photos)]
        pixels, errors = [], {}
        for k, photo in enumerate(photos):
            try:
                pixels.append(self._pixels(photo))
            except (OSError, ImageError) as exc:
                errors[k] = str(exc)
        decoded = self.decoder.decode(self.embedder.embed(np.stack(pixels))) if pixels else None
        results, row = [], 0
        for k, source in enumerate(sources):
            if k in errors:
                results.append(Caption(str(source), None, None, errors[k]))
                continue
            words = self.bundle.vocab.decode(decoded.tokens[row])
            results.append(Caption(str(source), " ".join(words), float(decoded.scores[row])))
            row += 1
        return results
