"""Image feature tables: the CNN stage's output, read by training and captioning.

A feature table is one row per image: `image_id`, the `source` URI it came from, the `backbone` that made it,
the `feature` vector (float32) and an `error` (null when the image was decoded and embedded). Two on-disk forms
are read: Parquet (a file or a directory of files, as written by extraction) and `.npz` with `ids` and
`features` arrays (the shared Flickr8k form).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (registers pa.compute, used below and by load_features)
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from imgcap.config import ExtractConfig
    from imgcap.decode import DecodeOptions

FEATURE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("backbone", pa.string()),
        ("feature", pa.list_(pa.float32())),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class FeatureTable:
    """Image ids, their source URIs and a [N, D] float32 feature matrix (rows with errors are dropped)."""

    ids: list[str]
    features: np.ndarray
    sources: list[str]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.features) or len(self.ids) != len(self.sources):
            raise ValueError("ids, sources and features must have the same length")

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def index(self) -> dict[str, int]:
        """Row number of every image id."""
        return {image_id: row for row, image_id in enumerate(self.ids)}

    def select(self, ids: list[str]) -> "FeatureTable":
        """The rows for `ids`, in that order; raises KeyError naming ids that have no features."""
        where = self.index()
        missing = [i for i in ids if i not in where]
        if missing:
            raise KeyError(f"{len(missing)} image id(s) have no features, e.g. {missing[:3]}")
        rows = np.array([where[i] for i in ids], dtype=np.int64)
        return FeatureTable(list(ids), self.features[rows], [self.sources[r] for r in rows])


def feature_matrix(column: pa.Array | pa.ChunkedArray, dim: int = -1) -> np.ndarray:
    """A [N, dim] float32 matrix from a list<float> column without nulls (dim -1: inferred)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), dim)


def load_features(path: str | Path) -> FeatureTable:
    """Read a feature table from `.npz` (ids, features) or Parquet (file or directory); drops error rows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"features not found: {path}")
    if path.suffix == ".npz":
        with np.load(path) as npz:
            missing = {"ids", "features"} - set(npz.files)
            if missing:
                raise ValueError(f"{path}: .npz must hold arrays 'ids' and 'features'; missing {sorted(missing)}")
            ids = [str(i) for i in npz["ids"]]
            features = np.asarray(npz["features"], dtype=np.float32)
        return FeatureTable(ids, features, [f"{path}#{i}" for i in ids])
    table = pq.read_table(path, columns=["image_id", "source", "feature", "error"])
    table = table.filter(pa.compute.is_null(table["error"]))
    if table.num_rows == 0:
        raise ValueError(f"{path}: no image has a feature (every row is empty or has an error)")
    ids = table["image_id"].to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate image ids in the feature table")
    return FeatureTable(ids, feature_matrix(table["feature"]), table["source"].to_pylist())


# --- extraction: images -> CNN features in Parquet (jobs/extract_features.py)

INCOMPLETE_DIR = "_incomplete"  # where unreadable Parquet files of an interrupted run are moved
_FAILURE_EXAMPLES = 5


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
        if self.missing:
            lines.append(f"  WARNING: {self.missing} listed image(s) have no row; rerun to extract them")
        return "\n".join(lines)


def backbone_tag(backbone: str, pooling: str) -> str:
    """The `backbone` column value: the name, plus the pooling when it is not the backbone's default."""
    return backbone if pooling == "default" else f"{backbone}/{pooling}"


def scan_output(output_dir: str | Path, tag: str | None = None) -> tuple[set[str], int]:
    """Image ids already written to `output_dir`, for resuming, and how many incomplete files were set aside.

    A Parquet file is only readable once its footer is written, so a file a killed run left half-written
    fails to open: it is moved to `_incomplete/` (ignored by readers) and its images count as not done.
    With `tag`, a directory holding rows of another backbone/pooling is refused rather than mixed.
    """
    root = Path(output_dir)
    done: set[str] = set()
    moved = 0
    for path in sorted(root.glob("*.parquet")) if root.is_dir() else []:
        if path.name.startswith(("_", ".")):
            continue
        try:
            table = pq.read_table(path, columns=["image_id", "backbone"])
        except (OSError, pa.ArrowException):
            (root / INCOMPLETE_DIR).mkdir(exist_ok=True)
            path.rename(root / INCOMPLETE_DIR / path.name)
            moved += 1
            continue
        if tag is not None and table.num_rows:
            others = set(pa.compute.unique(table["backbone"]).to_pylist()) - {tag}
            if others:
                raise ValueError(f"{root} holds features of {sorted(others)}, not {tag!r}: use another output_dir")
        done.update(table["image_id"].to_pylist())
    return done, moved


def feature_rows(image_ids: list[str], sources: list[str], tag: str, features: np.ndarray,
                 errors: list[str]) -> pa.Table:
    """A FEATURE_SCHEMA table: `features` holds one row per image whose error is "" (in order); the other
    rows get a null feature and their error message."""
    ok = np.array([not e for e in errors], dtype=bool)
    dim = features.shape[1] if features.ndim == 2 and len(features) else 0
    offsets = np.zeros(len(image_ids) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(ok * dim)
    feature = pa.ListArray.from_arrays(pa.array(offsets), pa.array(features.reshape(-1), pa.float32()),
                                       type=pa.list_(pa.float32()), mask=pa.array(~ok))
    return pa.Table.from_arrays(
        [pa.array(image_ids, pa.string()), pa.array(sources, pa.string()), pa.array([tag] * len(image_ids),
         pa.string()), feature, pa.array([e or None for e in errors], pa.string())],
        schema=FEATURE_SCHEMA,
    )


class CnnEmbedder:
    """Ray Data actor: loads the backbone once in `__init__`, then embeds decoded batches.

    GPUs (when Ray gave this actor one) get memory growth, so TensorFlow does not reserve the whole card.
    """

    def __init__(self, backbone: str, weights: str | None, pooling: str) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        from imgcap.backbones import build_backbone, get_backbone

        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        self._spec = get_backbone(backbone)
        self._model = build_backbone(backbone, weights, pooling)  # type: ignore[arg-type]
        self._tag = backbone_tag(backbone, pooling)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in errors], dtype=bool)
        features = np.zeros((0, 0), dtype=np.float32)
        if ok.any():
            inputs = self._spec.preprocess(batch["image"][ok])
            features = np.asarray(self._model.predict_on_batch(inputs), dtype=np.float32).reshape(int(ok.sum()), -1)
        return feature_rows([str(i) for i in batch["image_id"]], [str(s) for s in batch["source"]], self._tag,
                            features, errors)


def _read_shards(batch: pa.Table, s3: Any, chunk: int) -> Iterator[pa.Table]:
    """Ray Data task: shard rows -> raw image rows (image_id, source, data, error), `chunk` at a time."""
    from imgcap.sources import read_shard

    for shard in batch.to_pylist():
        for raws in read_shard(shard, s3, chunk):
            yield pa.table({
                "image_id": pa.array([r.image_id for r in raws], pa.string()),
                "source": pa.array([r.source for r in raws], pa.string()),
                "data": pa.array([r.data for r in raws], pa.binary()),
                "error": pa.array([r.error for r in raws], pa.string()),
            })


def _decode_task_memory(options: "DecodeOptions", images: int) -> int:
    """Bytes a decode task reserves: raw + decoded pixels of its images, with headroom for Pillow.

    Besides keeping the scheduler honest, this static remote arg differs from the CNN actors' args, and Ray
    Data only fuses a task map into the following actor map when their remote args are equal: so Pillow
    decoding stays on CPU tasks that scale apart from the actor pool instead of running inside the actors.
    """
    return 4 * images * options.size[0] * options.size[1] * 3 + (128 << 20)


def extract_features(config: "ExtractConfig") -> ExtractionSummary:
    """Extract features of every image of `config.sources` not yet in `config.output_dir`.

    Pipeline (Ray Data, streaming, so memory stays flat however many images there are): list sources on the
    driver -> read shards and decode with Pillow in CPU tasks -> embed in a pool of `config.actors` CNN actors
    (one model load each; `gpus_per_actor` GPUs each when the cluster has GPUs) -> Parquet files of at most
    `rows_per_file` rows. Bad images become rows with an error and no feature. Uses the running Ray
    cluster, or starts a local one.
    """
    import ray
    from ray.data.datasource import FilenameProvider

    from imgcap.backbones import get_backbone
    from imgcap.decode import DecodeOptions, decode_batch
    from imgcap.sources import S3Options, check_unique_ids, list_source, plan_shards

    started = time.perf_counter()
    spec = get_backbone(config.backbone)
    weights = config.weights_file or (None if config.weights == "none" else "imagenet")
    if config.weights_file and not Path(config.weights_file).is_file():
        raise FileNotFoundError(f"weights_file not found: {config.weights_file}")
    tag = backbone_tag(config.backbone, config.pooling)
    s3 = S3Options(config.s3.endpoint_url, config.s3.region, config.s3.profile, config.s3.anonymous)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    done, incomplete = scan_output(output, tag)

    refs = [ref for source in config.sources
            for ref in list_source(source.path, s3, recursive=source.recursive,
                                   include_archives=source.include_archives, extensions=config.extensions,
                                   id_from=config.id_from)]
    check_unique_ids(refs)
    todo = [ref for ref in refs if ref.image_id not in done]
    if not todo:
        return ExtractionSummary(str(output), tag, len(refs), len(refs), 0, 0,
                                 time.perf_counter() - started, 0, incomplete)

    run_id = f"run{time.strftime('%Y%m%d%H%M%S')}{uuid.uuid4().hex[:8]}"
    options = DecodeOptions(spec.input_size, config.resize, config.resample, config.max_pixels, config.jpeg_draft)
    shards = plan_shards(todo, config.shard_size)
    if not ray.is_initialized():
        ray.init()
    gpus = config.gpus_per_actor if ray.cluster_resources().get("GPU", 0) > 0 else 0
    cpu_task_args = {"num_cpus": 1, "memory": _decode_task_memory(options, config.shard_size)}
    dataset = (
        ray.data.from_items(shards, override_num_blocks=len(shards))
        .map_batches(_read_shards, fn_kwargs={"s3": s3, "chunk": min(32, config.shard_size)}, batch_size=1,
                     batch_format="pyarrow", **cpu_task_args)
        .map_batches(decode_batch, fn_kwargs={"options": options}, batch_size=None, batch_format="pyarrow",
                     **cpu_task_args)
        .map_batches(CnnEmbedder, fn_constructor_kwargs={"backbone": config.backbone, "weights": weights,
                                                         "pooling": config.pooling},
                     batch_size=config.batch_size, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=config.actors),
                     num_cpus=config.cpus_per_actor, num_gpus=gpus)
    )
    dataset.write_parquet(
        str(output),
        filename_provider=FilenameProvider(dataset_uuid=run_id, file_format="parquet"),
        min_rows_per_file=config.rows_per_file,
        max_rows_per_file=config.rows_per_file,
        schema=FEATURE_SCHEMA,
    )

    written = sorted(output.glob(f"{run_id}_*.parquet"))
    ok = failed = 0
    failures: list[tuple[str, str]] = []
    for path in written:  # count from what is on disk: the summary describes the output, not the intent
        table = pq.read_table(path, columns=["image_id", "error"])
        bad = table.filter(pa.compute.is_valid(table["error"]))
        failed += bad.num_rows
        ok += table.num_rows - bad.num_rows
        examples = bad.slice(0, max(0, _FAILURE_EXAMPLES - len(failures)))
        failures += list(zip(examples["image_id"].to_pylist(), examples["error"].to_pylist()))
    return ExtractionSummary(str(output), tag, len(refs), len(refs) - len(todo), ok, failed,
                             time.perf_counter() - started, len(written), incomplete, tuple(failures))
