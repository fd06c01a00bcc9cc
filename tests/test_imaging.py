"""Pillow decoding: every mode to RGB, EXIF orientation, resizing as load_img does, bombs and bad bytes."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pytest
from _imaging import jpeg_bytes, pattern
from PIL import Image

from imgcap.vision.imaging import ImageError, ImagingOptions, load_pixels, pixels_batch


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def decode(data: bytes, size=(4, 4), **kwargs) -> np.ndarray:
    return load_pixels(data, ImagingOptions(size=size, **kwargs))


def test_grey_palette_and_cmyk_become_rgb():
    grey = decode(encode(Image.new("L", (4, 4), 77)))
    assert grey.shape == (4, 4, 3) and grey.dtype == np.uint8 and (grey == 77).all()
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert (decode(encode(palette)) == [10, 200, 30]).all()
    cyan = decode(encode(Image.new("CMYK", (4, 4), (255, 0, 0, 0)), "JPEG", quality=100))
    assert np.abs(cyan.astype(int) - [0, 255, 255]).max() <= 3


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    out = decode(encode(rgba))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[1, 1]) == (255, 255, 255)  # fully transparent: white, not the hidden red (or black)
    assert np.abs(out[0, 1].astype(int) - [255, 127, 127]).max() <= 2
    la = Image.new("LA", (4, 4), (0, 0))
    assert (decode(encode(la)) == 255).all()
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    assert (decode(encode(palette, transparency=0)) == 255).all()


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]] * 4, dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # still 16-bit after the round trip
    out = decode(data)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_exif_orientation_is_applied():
    # Stored 64 wide x 32 high, left half red, right half blue; EXIF 6 = display rotated 90 degrees clockwise,
    # so the viewer (and the decoder) sees 32 wide x 64 high with red on top.
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    out = decode(data, size=(64, 32))  # (height, width): no resize needed once rotated
    assert out[:24, :, 0].mean() > 200 and out[:24, :, 2].mean() < 50
    assert out[-24:, :, 2].mean() > 200 and out[-24:, :, 0].mean() < 50


def test_stretch_matches_keras_load_img_and_center_crop_keeps_aspect(tmp_path):
    keras_utils = pytest.importorskip("keras.utils")
    path = tmp_path / "wide.jpg"
    path.write_bytes(jpeg_bytes(seed=3, width=100, height=80))
    expected = keras_utils.img_to_array(keras_utils.load_img(path, target_size=(224, 224))).astype(np.uint8)
    assert np.array_equal(load_pixels(path.read_bytes(), ImagingOptions((224, 224))), expected)
    expected_crop = keras_utils.img_to_array(
        keras_utils.load_img(path, target_size=(50, 50), keep_aspect_ratio=True)).astype(np.uint8)
    assert np.array_equal(decode(path.read_bytes(), (50, 50), resize="center_crop"), expected_crop)

    bands = np.zeros((30, 90, 3), np.uint8)
    bands[:, :30] = bands[:, 60:] = (255, 0, 0)
    bands[:, 30:60] = (0, 255, 0)
    wide = encode(Image.fromarray(bands))
    crop = decode(wide, (30, 30), resize="center_crop")
    assert (crop == [0, 255, 0]).all()  # only the centre square survives
    stretch = decode(wide, (30, 30))
    assert (stretch[:, 0] == [255, 0, 0]).all() and (stretch[:, 15] == [0, 255, 0]).all()


def test_jpeg_draft_is_close_to_full_decode():
    photo = Image.fromarray(pattern(128, 96, seed=4)).resize((1024, 768), Image.Resampling.BICUBIC)
    data = encode(photo, "JPEG", quality=90)
    full = decode(data, (96, 128), resample="bilinear").astype(int)
    draft = decode(data, (96, 128), resample="bilinear", jpeg_draft=True).astype(int)
    assert draft.shape == full.shape and np.abs(draft - full).mean() < 3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file (0 bytes)"),
        (None, "empty file (0 bytes)"),
        (b"hello, I am text", "not an image"),
        (jpeg_bytes(seed=1, width=256, height=256)[:1200], "corrupt image"),
    ],
)
def test_bad_bytes_raise_decode_error(data, message):
    with pytest.raises(ImageError, match=re.escape(message)):
        decode(data)


def test_pixel_cap_refuses_before_decoding():
    with pytest.raises(ImageError, match=r"image too large: 64x48 = 3072 pixels > max_pixels 3000"):
        decode(jpeg_bytes(width=64, height=48), max_pixels=3000)
    assert decode(jpeg_bytes(width=64, height=48), max_pixels=3072).shape == (4, 4, 3)


def test_pixels_batch_turns_failures_into_error_rows():
    good = jpeg_bytes(seed=2, width=8, height=8)
    batch = pa.table({
        "image_id": ["a", "b", "c"],
        "source": ["/a.jpg", "/b.jpg", "/c.jpg"],
        "data": pa.array([good, b"junk", None], pa.binary()),
        "error": ["", "", "unreadable: FileNotFoundError: gone"],
    })
    out = pixels_batch(batch, ImagingOptions(size=(8, 8)))
    assert out["image"].shape == (3, 8, 8, 3)
    assert list(out["error"]) == ["", out["error"][1], "unreadable: FileNotFoundError: gone"]
    assert out["error"][1].startswith("not an image")
    assert np.abs(out["image"][0].astype(int) - pattern(8, 8, 2)).mean() < 10
    assert not out["image"][1:].any()


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="resample must be one of"):
        ImagingOptions(resample="cubic-ish")
