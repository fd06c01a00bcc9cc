"""The extraction job: images -> CNN features in Parquet, on Ray Data (jobs/extract_features.py).

One streaming pipeline, so memory stays flat however many images there are: sources are listed on the driver
(`imgcap.io.sources`), read and turned into pixels by CPU tasks (`imgcap.vision.imaging`), embedded by a pool of CNN
actors (`imgcap.vision.embedder`; one model load each, `gpus_per_actor` GPUs each when > 0) and written to a
resumable Parquet directory (`imgcap.io.outputs.OutputDirectory`, local or ``s3://``) with the `EmbeddingSpec` that
made it in ``_embedding.json``. Bad images become rows with an error and no feature.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from imgcap.batch.actors import actor_pool_args, check_gpus_schedulable
from imgcap.batch.reading import pixels_dataset
from imgcap.config.jobs import ActorPoolConfig, ExtractConfig
from imgcap.data.feature_table import FeatureDtype, feature_rows, feature_schema
from imgcap.io.outputs import INCOMPLETE_DIR, OutputDirectory
from imgcap.io.sources import list_images
from imgcap.io.storage import S3Options
from imgcap.runtime.cluster import init_ray
from imgcap.runtime.fault_injection import fault_point
from imgcap.runtime.recovery import Recovery, RecoveryWatch
from imgcap.vision.embedder import CnnEmbedder, resolve_weights
from imgcap.vision.spec import EMBEDDING_FILE, EmbeddingSpec


@dataclass(frozen=True)
class ExtractionSummary:
    """What one extraction run did. `ok + failed` rows were written by this run; `skipped` images were
    already in the output; `missing` (always 0 unless the pipeline lost rows) is listed minus all of those."""

    output_dir: str
    backbone: str
    listed: int
    skipped: int
    ok: int
    failed: int
    seconds: float
    files_written: int
    incomplete_files: int  # unreadable files left by an interrupted run, moved to _incomplete/
    failures: tuple[tuple[str, str], ...] = ()  # the first few (image_id, error)
    recovery: Recovery | None = None  # what Ray retried (None: not known, or nothing ran)

    @property
    def missing(self) -> int:
        return self.listed - self.skipped - self.ok - self.failed

    @property
    def images_per_second(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        """A human-readable closing report."""
        lines = [
            f"extraction ({self.backbone}) -> {self.output_dir}",
            f"  images listed {self.listed}, already done (skipped) {self.skipped}, "
            f"ok {self.ok}, failed {self.failed}",
            f"  {self.seconds:.1f} s, {self.images_per_second:.1f} img/s, {self.files_written} Parquet file(s) written",
        ]
        if self.incomplete_files:
            lines.append(f"  {self.incomplete_files} incomplete file(s) of an interrupted run moved to "
                         f"{INCOMPLETE_DIR}/ (their images were extracted again)")
        lines += [f"  failed: {image_id}: {error}" for image_id, error in self.failures]
        if self.failed > len(self.failures):
            lines.append(f"  ... {self.failed - len(self.failures)} more failures (rows with an error in the output)")
        if self.recovery is not None and self.recovery.anything:
            lines.append(f"  {self.recovery.format()}")
        if self.missing:
            lines.append(f"  WARNING: {self.missing} listed image(s) have no row; rerun to extract them")
        return "\n".join(lines)


def record_embedding(output: OutputDirectory, spec: EmbeddingSpec) -> None:
    """Write `spec` next to the features, or refuse an output directory whose features were made another way
    (rows of two embeddings in one table would train and caption inconsistently)."""
    recorded = output.read_file(EMBEDDING_FILE)
    if recorded is not None:
        found = EmbeddingSpec.from_dict(json.loads(recorded))
        if found != spec:
            raise FileExistsError(f"{output.uri} holds features made with {found}, not {spec}: use another output_dir")
        return
    output.write_file(EMBEDDING_FILE, spec.to_json().encode("utf-8"))


def extract_features(config: ExtractConfig) -> ExtractionSummary:
    """Extract features of every image of `config.sources` not yet in `config.output_dir` (see the module
    docstring). Uses the running Ray cluster, or starts a local one."""
    started = time.perf_counter()
    spec = EmbeddingSpec(config.backbone, config.pooling, config.resize, config.resample, config.jpeg_draft)
    weights = resolve_weights(config.weights, config.weights_file)
    s3 = S3Options.from_config(config.s3)
    output = OutputDirectory(config.output_dir, s3)
    done, incomplete = output.scan({"backbone": spec.tag})
    record_embedding(output, spec)

    refs = list_images(config.sources, s3, config.extensions, config.id_from)
    todo = [ref for ref in refs if ref.image_id not in done]
    if not todo:
        return ExtractionSummary(config.output_dir, spec.tag, len(refs), len(refs), 0, 0,
                                 time.perf_counter() - started, 0, incomplete)
    init_ray()
    watch = RecoveryWatch()
    check_gpus_schedulable(config.pool)
    pixels = pixels_dataset(todo, spec.imaging(config.max_pixels), s3, config.shard_size)
    features = embed_dataset(pixels, spec, weights, config.batch_size, config.pool, config.feature_dtype)
    written = output.write(features, feature_schema(config.feature_dtype), config.rows_per_file)
    return ExtractionSummary(config.output_dir, spec.tag, len(refs), len(refs) - len(todo), written.ok,
                             written.failed, time.perf_counter() - started, written.files, incomplete,
                             written.failures, watch.report())


class FeatureExtractor(CnnEmbedder):
    """Ray Data actor of extraction: `pixels_batch` rows -> feature rows (`feature_schema(dtype)`, plus the
    batch's `thumbnail` column when it has one); bad images keep their error and get no feature."""

    def __init__(self, spec: EmbeddingSpec, weights: str | None, on_ray: bool = False,
                 dtype: FeatureDtype = "float32") -> None:
        super().__init__(spec, weights, on_ray)
        self.dtype = dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        fault_point("cnn")
        errors = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in errors], dtype=bool)
        table = feature_rows([str(i) for i in batch["image_id"]], [str(s) for s in batch["source"]],
                             self.spec.tag, self.embed(batch["image"][ok]), errors, self.dtype)
        if "thumbnail" in batch:
            table = table.append_column("thumbnail", pa.array(list(batch["thumbnail"]), pa.binary()))
        return table


def embed_dataset(pixels: Any, spec: EmbeddingSpec, weights: str | None, batch_size: int,
                  pool: ActorPoolConfig, dtype: FeatureDtype = "float32") -> Any:
    """Extraction's CNN stage: a Ray Dataset of `pixels_batch` rows -> feature rows stored as `dtype`, through
    a pool of `FeatureExtractor` actors (one model load each, `batch_size` images a call)."""
    return pixels.map_batches(FeatureExtractor,
                              fn_constructor_kwargs={"spec": spec, "weights": weights, "on_ray": True, "dtype": dtype},
                              batch_size=batch_size, batch_format="numpy", **actor_pool_args(pool))
