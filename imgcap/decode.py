"""Image decoding for feature extraction: bytes -> a fixed-size RGB uint8 array, on CPU tasks.

Decoding follows the seeds (`keras.utils.load_img(path, target_size=...)`): Pillow decode, convert to RGB,
resize the whole image to the backbone's input without cropping (`resize = "stretch"`), with nearest-neighbour
resampling by default as `load_img` does. `resize = "center_crop"` keeps the aspect ratio instead: the largest
centred box of the target aspect ratio is resized to the target (what `load_img(keep_aspect_ratio=True)` does).

On top of the seeds: the EXIF orientation is applied (phone photos are stored rotated); every Pillow mode ends
up RGB the way a viewer shows it: transparent images (RGBA, LA, PA, P with transparency) are composited on
white, 16/32-bit integer images (I;16*, I) are scaled from their 0..65535 range to 0..255 (Pillow's plain
convert would clip them to white), float images (F) are taken as 0..1 when their maximum is <= 1 and as 0..255
otherwise, CMYK uses Pillow's conversion. Images above `max_pixels` are refused before their pixels are
decoded (decompression bombs). `jpeg_draft = true` lets libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale
(never below the target size), several times faster, at the cost of not matching `load_img` bit for bit.

Every failure (empty, truncated, not an image, too large) is reported as an error string on that image's row;
`decode_batch` never raises for bad data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class DecodeError(ValueError):
    """One image could not be turned into pixels; the message is what lands in its `error` column."""


@dataclass(frozen=True)
class DecodeOptions:
    """How images become arrays: `size` is (height, width) of the backbone input."""

    size: tuple[int, int] = (224, 224)
    resize: Literal["stretch", "center_crop"] = "stretch"
    resample: str = "nearest"
    max_pixels: int = 50_000_000
    jpeg_draft: bool = False

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}; got {self.resample!r}")
        if self.resize not in ("stretch", "center_crop"):
            raise ValueError(f"resize must be 'stretch' or 'center_crop'; got {self.resize!r}")


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    """An L image from a 16/32-bit integer or float greyscale image, scaling its range rather than clipping."""
    pixels = np.asarray(image)
    if image.mode == "F":
        scale = 255.0 if pixels.size and float(np.nanmax(pixels)) <= 1.0 else 1.0
        values = np.nan_to_num(pixels.astype(np.float64) * scale)
    else:  # I;16, I;16B, I;16L, I: 16-bit samples (I holds them widened to 32 bits)
        values = pixels.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited on white, high bit depths scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    if image.mode.startswith("I") or image.mode == "F":
        image = _scaled_to_8bit(image)
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _crop_box(width: int, height: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """The largest centred box of the target's aspect ratio (the arithmetic of load_img keep_aspect_ratio)."""
    crop_h = min(height, (width * target_h) // target_w)
    crop_w = min(width, (height * target_w) // target_h)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def decode_image(data: bytes | None, options: DecodeOptions) -> np.ndarray:
    """Decode image bytes to a [height, width, 3] uint8 array; raises DecodeError saying what is wrong."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large: {exc}") from None
    except Exception as exc:  # UnidentifiedImageError and friends: not an image Pillow knows
        raise DecodeError(f"not an image: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > options.max_pixels:
        raise DecodeError(f"image too large: {width}x{height} = {width * height} pixels > max_pixels "
                          f"{options.max_pixels}")
    target_h, target_w = options.size
    try:
        if options.jpeg_draft and image.format == "JPEG":
            # Draft mode keeps both sides >= the request, so the final resize only ever shrinks.
            image.draft("RGB", (target_w, target_h))
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
        if options.resize == "center_crop":
            box = _crop_box(image.width, image.height, target_h, target_w)
            image = image.resize((target_w, target_h), RESAMPLE[options.resample], box=box)
        elif image.size != (target_w, target_h):
            image = image.resize((target_w, target_h), RESAMPLE[options.resample])
        pixels = np.asarray(image, dtype=np.uint8)
    except Exception as exc:  # truncated or corrupt pixel data surfaces only now, when pixels are decoded
        raise DecodeError(f"corrupt image: {type(exc).__name__}: {exc}") from None
    if pixels.shape != (target_h, target_w, 3):
        raise DecodeError(f"decoded to shape {pixels.shape}, expected {(target_h, target_w, 3)}")
    return pixels


def decode_batch(batch: pa.Table, options: DecodeOptions) -> dict[str, np.ndarray]:
    """A Ray Data batch of raw images (image_id, source, data, error) -> decoded arrays.

    Returns columns image_id, source, image ([B, H, W, 3] uint8; zeros on error rows) and error ("" when
    the image decoded). A read error already on the row is kept as is.
    """
    count = batch.num_rows
    images = np.zeros((count, *options.size, 3), dtype=np.uint8)
    errors = batch["error"].to_pylist()
    for row, data in enumerate(batch["data"].to_pylist()):
        if errors[row]:
            continue
        try:
            images[row] = decode_image(data, options)
        except DecodeError as exc:
            errors[row] = str(exc)
    return {
        "image_id": np.asarray(batch["image_id"].to_pylist(), dtype=object),
        "source": np.asarray(batch["source"].to_pylist(), dtype=object),
        "image": images,
        "error": np.asarray(errors, dtype=object),
    }
