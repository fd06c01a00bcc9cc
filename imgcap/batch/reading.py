"""The read stage both Ray Data jobs share: image refs -> raw bytes -> pixels, on CPU tasks, streamed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from imgcap.vision.imaging import ImagingOptions, pixels_batch


def _read_shards(batch: pa.Table, s3: Any, chunk: int) -> Iterator[pa.Table]:
    """Ray Data task: shard rows -> raw image rows (image_id, source, data, error), `chunk` at a time."""
    from imgcap.io.sources import read_shard
    from imgcap.runtime.fault_injection import fault_point

    fault_point("read")
    for shard in batch.to_pylist():
        for raws in read_shard(shard, s3, chunk):
            yield pa.table({
                "image_id": pa.array([r.image_id for r in raws], pa.string()),
                "source": pa.array([r.source for r in raws], pa.string()),
                "data": pa.array([r.data for r in raws], pa.binary()),
                "error": pa.array([r.error for r in raws], pa.string()),
            })


READ_TASK_RETRIES = 10


def _task_memory(options: ImagingOptions, images: int) -> int:
    """Bytes a read + pixels task reserves: raw + RGB pixels of its images, with headroom for Pillow.

    Besides keeping the scheduler honest, this static remote arg differs from the CNN actors' args, and Ray
    Data only fuses a task map into the following actor map when their remote args are equal: so Pillow
    stays on CPU tasks that scale apart from the actor pool instead of running inside the actors.
    """
    return 4 * images * options.size[0] * options.size[1] * 3 + (192 << 20)


def pixels_dataset(refs: Sequence[Any], options: ImagingOptions, s3: Any, shard_size: int,
                   thumbnail_size: int = 0) -> Any:
    """A Ray Dataset of `pixels_batch` rows for `refs` (imgcap.io.sources.ImageRef), read and turned into pixels
    by CPU tasks, `shard_size` images per task (one task per compressed tar), streamed: nothing is
    materialised, so memory stays flat in the number of images."""
    import ray.data

    from imgcap.io.sources import plan_shards

    shards = plan_shards(refs, shard_size)
    # A read task that dies with its worker or node, or raises an OSError (what `read_shard` lets through: a
    # storage error still transient after the filesystem's own retries), is run again, a bounded number of
    # times so a persistent failure ends the job instead of looping; its rows are emitted once either way.
    task_args = {"num_cpus": 1, "memory": _task_memory(options, shard_size), "max_retries": READ_TASK_RETRIES,
                 "retry_exceptions": [OSError]}
    return (
        ray.data.from_items(shards, override_num_blocks=len(shards))
        .map_batches(_read_shards, fn_kwargs={"s3": s3, "chunk": min(32, shard_size)}, batch_size=1,
                     batch_format="pyarrow", **task_args)
        .map_batches(pixels_batch, fn_kwargs={"options": options, "thumbnail_size": thumbnail_size},
                     batch_size=None, batch_format="pyarrow", **task_args)
    )
