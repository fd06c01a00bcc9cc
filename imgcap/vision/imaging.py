"""Imaging: image bytes -> a fixed-size RGB uint8 array (the CNN input), on CPU tasks.

("Decoding" in imgcap means ids -> caption words; this module turns bytes into pixels.)

Pixels follow the seeds (`keras.utils.load_img(path, target_size=...)`): Pillow opens the image, converts it to
RGB and resizes the whole image to the backbone's input without cropping (`resize = "stretch"`), with
nearest-neighbour resampling by default as `load_img` does. `resize = "center_crop"` keeps the aspect ratio
instead: the largest centred box of the target aspect ratio is resized to the target (what
`load_img(keep_aspect_ratio=True)` does).

On top of the seeds: the EXIF orientation is applied (phone photos are stored rotated); every Pillow mode ends
up RGB the way a viewer shows it: transparent images (RGBA, LA, PA, P with transparency) are composited on
white, 16/32-bit integer images (I;16*, I) are scaled from their 0..65535 range to 0..255 (Pillow's plain
convert would clip them to white), float images (F) are taken as 0..1 when their maximum is <= 1 and as 0..255
otherwise, CMYK uses Pillow's conversion. Images above `max_pixels` are refused before their pixels are
read (decompression bombs). `jpeg_draft = true` lets libjpeg read large JPEGs at 1/2, 1/4 or 1/8 scale
(never below the target size), several times faster, at the cost of not matching `load_img` bit for bit.

Every failure (empty, truncated, not an image, too large) is reported as an error string on that image's row;
`pixels_batch` never raises for bad data. It can also make a small JPEG thumbnail of each image (aspect ratio
kept) for the HTML contact sheet of the captioning job.
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


class ImageError(ValueError):
    """One image could not be turned into pixels; the message is what lands in its `error` column."""


@dataclass(frozen=True)
class ImagingOptions:
    """How images become arrays: `size` is (height, width) of the backbone input. Recorded with the features
    and in every model bundle (see imgcap.vision.spec.EmbeddingSpec), so new photos get the same pixels."""

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


def open_rgb(data: bytes | None, options: ImagingOptions) -> Image.Image:
    """Open image bytes as an upright RGB image (pixels read, not yet resized); raises ImageError saying why not."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}") from None
    except Exception as exc:  # UnidentifiedImageError and friends: not an image Pillow knows
        raise ImageError(f"not an image: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > options.max_pixels:
        raise ImageError(f"image too large: {width}x{height} = {width * height} pixels > max_pixels "
                         f"{options.max_pixels}")
    try:
        if options.jpeg_draft and image.format == "JPEG":
            # Draft mode keeps both sides >= the request, so the final resize only ever shrinks.
            image.draft("RGB", (options.size[1], options.size[0]))
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
        image.load()
    except Exception as exc:  # truncated or corrupt pixel data surfaces only now, when pixels are read
        raise ImageError(f"corrupt image: {type(exc).__name__}: {exc}") from None
    return image


def fit_to_input(image: Image.Image, options: ImagingOptions) -> np.ndarray:
    """An RGB image resized to the backbone input as `options` say -> [height, width, 3] uint8."""
    target_h, target_w = options.size
    if options.resize == "center_crop":
        box = _crop_box(image.width, image.height, target_h, target_w)
        image = image.resize((target_w, target_h), RESAMPLE[options.resample], box=box)
    elif image.size != (target_w, target_h):
        image = image.resize((target_w, target_h), RESAMPLE[options.resample])
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.shape != (target_h, target_w, 3):
        raise ImageError(f"read to shape {pixels.shape}, expected {(target_h, target_w, 3)}")
    return pixels


def load_pixels(data: bytes | None, options: ImagingOptions) -> np.ndarray:
    """Image bytes -> the backbone's [height, width, 3] uint8 input; raises ImageError saying what is wrong."""
    return fit_to_input(open_rgb(data, options), options)


def thumbnail_jpeg(image: Image.Image, size: int, quality: int = 80) -> bytes:
    """A JPEG of `image` whose longer side is `size` pixels (aspect ratio kept), for contact sheets."""
    thumb = image.copy()
    thumb.thumbnail((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    thumb.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def pixels_batch(batch: pa.Table, options: ImagingOptions, thumbnail_size: int = 0) -> dict[str, np.ndarray]:
    """A Ray Data batch of raw images (image_id, source, data, error) -> the CNN's input arrays.

    Returns columns image_id, source, image ([B, H, W, 3] uint8; zeros on error rows) and error ("" when
    the image was read), plus `thumbnail` (JPEG bytes, None on error rows) when `thumbnail_size` > 0. A read
    error already on the row is kept as is.
    """
    count = batch.num_rows
    images = np.zeros((count, *options.size, 3), dtype=np.uint8)
    thumbnails: list[bytes | None] = [None] * count
    errors = batch["error"].to_pylist()
    for row, data in enumerate(batch["data"].to_pylist()):
        if errors[row]:
            continue
        try:
            image = open_rgb(data, options)
            images[row] = fit_to_input(image, options)
            if thumbnail_size:
                thumbnails[row] = thumbnail_jpeg(image, thumbnail_size)
        except ImageError as exc:
            errors[row] = str(exc)
    columns = {
        "image_id": np.asarray(batch["image_id"].to_pylist(), dtype=object),
        "source": np.asarray(batch["source"].to_pylist(), dtype=object),
        "image": images,
        "error": np.asarray(errors, dtype=object),
    }
    if thumbnail_size:
        columns["thumbnail"] = np.asarray(thumbnails, dtype=object)
    return columns


