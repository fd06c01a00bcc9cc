"""Embedding: pixels -> a CNN feature vector, written once for every job that needs it.

`EmbeddingSpec` is everything that decides which feature a photo gets: the backbone, its pooling and how the
bytes became pixels (resize, resample, JPEG draft). Extraction records it next to its Parquet files
(``_embedding.json``), training copies it into the bundle, and the captioning job and ``imgcap caption`` read
it from the bundle, so new photos are embedded exactly as the training features were.

`CnnEmbedder` holds one backbone: the Ray Data actor of extraction, the CNN half of the captioning job's
actor (`imgcap.caption_job.ImageCaptioner`), and the in-process embedder of ``imgcap caption``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgcap.imaging import ImagingOptions

if TYPE_CHECKING:
    from imgcap.config import ActorPoolConfig

EMBEDDING_FILE = "_embedding.json"  # next to extraction's Parquet files; readers skip "_" names


@dataclass(frozen=True)
class EmbeddingSpec:
    """How a photo becomes a feature: backbone + pooling + the imaging options (see imgcap.imaging)."""

    backbone: str
    pooling: str = "default"
    resize: str = "stretch"
    resample: str = "nearest"
    jpeg_draft: bool = False

    @property
    def tag(self) -> str:
        """The `backbone` column value: the name, plus the pooling when it is not the backbone's default."""
        return self.backbone if self.pooling == "default" else f"{self.backbone}/{self.pooling}"

    @classmethod
    def from_tag(cls, tag: str) -> "EmbeddingSpec":
        """The spec of a backbone tag (``mobilenet_v2`` or ``vgg16/avg``) with the default imaging, which is
        how features were made when nothing else was recorded (the seeds' load_img: stretch, nearest)."""
        name, _, pooling = tag.partition("/")
        return cls(name, pooling or "default")

    def imaging(self, max_pixels: int = ImagingOptions.max_pixels) -> ImagingOptions:
        """The imaging options for this backbone's input size (`max_pixels` is a safety cap, not a choice
        that changes features, so it is the job's and not recorded)."""
        from imgcap.backbones import get_backbone

        return ImagingOptions(get_backbone(self.backbone).input_size, self.resize,  # type: ignore[arg-type]
                              self.resample, max_pixels, self.jpeg_draft)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EmbeddingSpec":
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def read_embedding(features: str | Path) -> EmbeddingSpec | None:
    """The spec extraction recorded next to a features directory (None for other tables, e.g. an .npz)."""
    recorded = Path(features) / EMBEDDING_FILE
    if not recorded.is_file():
        return None
    return EmbeddingSpec.from_dict(json.loads(recorded.read_text(encoding="utf-8")))


def check_gpus_visible(assigned: list, visible: list) -> None:
    """Fail loudly when Ray gave this process GPUs that TensorFlow cannot see (a CPU-only TensorFlow on a GPU
    node, missing CUDA libraries): silently running the CNN on the CPU would be many times slower."""
    if assigned and not visible:
        raise RuntimeError(
            f"Ray assigned GPU(s) {assigned} to this CNN actor but TensorFlow sees no GPU: install "
            f"tensorflow[and-cuda] on GPU nodes (see cluster/), or set gpus_per_actor = 0 to run on CPU")


class CnnEmbedder:
    """One backbone, loaded once: pixels [B, H, W, 3] uint8 -> features [B, D] float32.

    As a Ray Data actor (`__call__` on decoded batches) it checks that a GPU Ray assigned is one TensorFlow
    sees and turns on memory growth, so TensorFlow does not reserve the whole card.
    """

    def __init__(self, spec: EmbeddingSpec, weights: str | None, on_ray: bool = False) -> None:
        from imgcap.runtime import import_tensorflow

        tf = import_tensorflow()  # before anything imports TensorFlow in this process: no CPU banners
        from imgcap.backbones import build_backbone, get_backbone

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

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        """A Ray Data batch from `imgcap.imaging.pixels_batch` -> feature rows (FEATURE_SCHEMA, plus the
        batch's `thumbnail` column when it has one)."""
        from imgcap.fault_injection import fault_point
        from imgcap.feature_table import feature_rows

        fault_point("cnn")
        errors = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in errors], dtype=bool)
        table = feature_rows([str(i) for i in batch["image_id"]], [str(s) for s in batch["source"]],
                             self.spec.tag, self.embed(batch["image"][ok]), errors)
        if "thumbnail" in batch:
            import pyarrow as pa

            table = table.append_column("thumbnail", pa.array(list(batch["thumbnail"]), pa.binary()))
        return table


def resolve_weights(weights: str, weights_file: str | None) -> str | None:
    """What `build_backbone` takes from a job's `weights` / `weights_file` keys ("imagenet", a file, None)."""
    if weights_file:
        if not Path(weights_file).is_file():
            raise FileNotFoundError(f"weights_file not found: {weights_file}")
        return weights_file
    return None if weights == "none" else "imagenet"


def embed_dataset(pixels: Any, spec: EmbeddingSpec, weights: str | None, batch_size: int,
                  pool: "ActorPoolConfig") -> Any:
    """Extraction's CNN stage: a Ray Dataset of `pixels_batch` rows -> feature rows, through a pool of
    CnnEmbedder actors (one model load each, `batch_size` images a call)."""
    from imgcap.runtime import actor_pool_args

    return pixels.map_batches(CnnEmbedder, fn_constructor_kwargs={"spec": spec, "weights": weights, "on_ray": True},
                              batch_size=batch_size, batch_format="numpy", **actor_pool_args(pool))
