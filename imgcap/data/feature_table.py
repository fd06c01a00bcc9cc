"""Image feature tables: the CNN stage's output, read by training and captioning.

A feature table is one row per image: `image_id`, the `source` URI it came from, the `backbone` that made it,
the `feature` vector (float32, or float16 for large grids: half the disk and memory) and an `error` (null
when the image was read and embedded). Two on-disk forms
are read: Parquet (a file or a directory of files, as written by extraction, which records how the features
were made next to them: see `imgcap.vision.spec.read_embedding`) and `.npz` with `ids` and `features` arrays (the
shared Flickr8k form).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (registers pa.compute, used below and by load_features)
import pyarrow.dataset as pads

FeatureDtype = Literal["float32", "float16"]
_ARROW_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def feature_schema(dtype: FeatureDtype = "float32") -> pa.Schema:
    """The schema of a feature table whose vectors are stored as `dtype`."""
    return pa.schema([
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("backbone", pa.string()),
        ("feature", pa.list_(_ARROW_DTYPES[dtype])),
        ("error", pa.string()),
    ])


FEATURE_SCHEMA = feature_schema()


@dataclass(frozen=True)
class FeatureTable:
    """Image ids, their source URIs and a [N, D] feature matrix, float32 or float16 as stored (rows with errors
    are dropped); consumers cast batches to float32."""

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


def feature_matrix(column: pa.Array | pa.ChunkedArray, dim: int = -1, dtype: type = np.float32) -> np.ndarray:
    """A [N, dim] matrix from a list<float> column without nulls (dim -1: inferred), as `dtype` (None: as
    stored, so float16 grids stay half the memory)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return (values if dtype is None else values.astype(dtype, copy=False)).reshape(len(column), dim)


def load_features(path: str | Path) -> FeatureTable:
    """Read a feature table from `.npz` (ids, features) or Parquet (file or directory); drops error rows. The
    features keep their stored precision (float16 grids are not widened here)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"features not found: {path}")
    if path.suffix == ".npz":
        with np.load(path) as npz:
            missing = {"ids", "features"} - set(npz.files)
            if missing:
                raise ValueError(f"{path}: .npz must hold arrays 'ids' and 'features'; missing {sorted(missing)}")
            ids = [str(i) for i in npz["ids"]]
            features = np.asarray(npz["features"])
            if features.dtype not in (np.float16, np.float32):
                features = features.astype(np.float32)
        return FeatureTable(ids, features, [f"{path}#{i}" for i in ids])
    return _read_parquet_features(path)


def _read_parquet_features(path: Path) -> FeatureTable:
    """Stream a Parquet file or directory batch by batch into one preallocated matrix: memory peaks at the
    matrix plus one batch, not at twice the table (grids of a few thousand photos are GBs)."""
    dataset = pads.dataset(path, format="parquet", exclude_invalid_files=False)
    columns = ["image_id", "source", "feature", "error"]
    ids: list[str] = []
    sources: list[str] = []
    matrix: np.ndarray | None = None
    for batch in dataset.to_batches(columns=columns, batch_size=256):
        batch = batch.filter(pa.compute.is_null(batch.column("error")))
        if not batch.num_rows:
            continue
        rows = feature_matrix(batch.column("feature"), dtype=None)
        if matrix is None:  # sized for every row of the table: error rows only leave its tail unused
            matrix = np.empty((dataset.count_rows(), rows.shape[1]), dtype=rows.dtype)
        matrix[len(ids):len(ids) + len(rows)] = rows
        ids += batch.column("image_id").to_pylist()
        sources += batch.column("source").to_pylist()
    if matrix is None:
        raise ValueError(f"{path}: no image has a feature (every row is empty or has an error)")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate image ids in the feature table")
    return FeatureTable(ids, matrix[:len(ids)], sources)


def feature_rows(image_ids: list[str], sources: list[str], tag: str, features: np.ndarray,
                 errors: list[str], dtype: FeatureDtype = "float32") -> pa.Table:
    """A `feature_schema(dtype)` table: `features` holds one row per image whose error is "" (in order); the
    other rows get a null feature and their error message."""
    ok = np.array([not e for e in errors], dtype=bool)
    dim = features.shape[1] if features.ndim == 2 and len(features) else 0
    offsets = np.zeros(len(image_ids) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(ok * dim)
    values = features.reshape(-1).astype(np.dtype(dtype), copy=False)
    feature = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, _ARROW_DTYPES[dtype]),
                                       type=pa.list_(_ARROW_DTYPES[dtype]), mask=pa.array(~ok))
    return pa.Table.from_arrays(
        [pa.array(image_ids, pa.string()), pa.array(sources, pa.string()), pa.array([tag] * len(image_ids),
         pa.string()), feature, pa.array([e or None for e in errors], pa.string())],
        schema=feature_schema(dtype),
    )
