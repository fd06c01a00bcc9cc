"""Embedding: pixels -> a CNN feature vector, written once for every job that needs it.

`CnnEmbedder` holds one backbone: the CNN of extraction's actors (`imgcap.batch.extract.FeatureExtractor`),
of the captioning job's actors (`imgcap.batch.caption.ImageCaptioner`) and of ``imgcap caption``. TensorFlow
and Ray are imported inside its constructor on purpose: drivers import this module without loading them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgcap.runtime.logs import import_tensorflow
from imgcap.vision.backbones import build_backbone, get_backbone
from imgcap.vision.spec import EmbeddingSpec


def check_gpus_visible(assigned: list, visible: list) -> None:
    """Fail loudly when Ray gave this process GPUs that TensorFlow cannot see (a CPU-only TensorFlow on a GPU
    node, missing CUDA libraries): silently running the CNN on the CPU would be many times slower."""
    if assigned and not visible:
        raise RuntimeError(
            f"Ray assigned GPU(s) {assigned} to this CNN actor but TensorFlow sees no GPU: install "
            f"tensorflow[and-cuda] on GPU nodes (see cluster/), or set gpus_per_actor = 0 to run on CPU")


class CnnEmbedder:
    """One backbone, loaded once: pixels [B, H, W, 3] uint8 -> features [B, D] float32.

    On Ray (`on_ray`) it checks that a GPU Ray assigned is one TensorFlow sees; on any GPU it turns on memory
    growth, so TensorFlow does not reserve the whole card.
    """
    def __init__(self, spec: EmbeddingSpec, weights: str | None, on_ray: bool = False) -> None:

        tf = import_tensorflow()  # before anything imports TensorFlow in this process: no CPU banners

        gpus = tf.config.list_physical_devices("GPU")
        if on_ray:
            import ray

            check_gpus_visible(ray.get_gpu_ids(), gpus)
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        self.spec = spec
        self._backbone = get_backbone(spec.backbone)
        self._model = build_backbone(spec.backbone, weights, spec.pooling)  # type: ignore[arg-type]

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Features of a batch of pixel arrays, one row per image."""
        if not len(pixels):
            return np.zeros((0, self._backbone.feature_dim(self.spec.pooling)), np.float32)  # type: ignore[arg-type]
        inputs = self._backbone.preprocess(pixels)
        return np.asarray(self._model.predict_on_batch(inputs), dtype=np.float32).reshape(len(pixels), -1)


def resolve_weights(weights: str, weights_file: str | None) -> str | None:
    """What `build_backbone` takes from a job's `weights` / `weights_file` keys ("imagenet", a file, None)."""
    if weights_file:
        if not Path(weights_file).is_file():
            raise FileNotFoundError(f"weights_file not found: {weights_file}")
        return weights_file
    return None if weights == "none" else "imagenet"


