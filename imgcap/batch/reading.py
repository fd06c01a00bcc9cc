"""The read stage both Ray Data jobs share: image refs -> raw bytes -> pixels, on CPU tasks, streamed.

Ray is imported inside `pixels_dataset` on purpose: the read functions run in Ray workers that need not
import the driver's Ray Data planner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from imgcap.io.sources import ImageRef, RawImage, plan_shards, read_shard
from imgcap.io.storage import S3Options
from imgcap.runtime.fault_injection import fault_point
from imgcap.vision.imaging import ImagingOptions, pixels_batch

log = logging.getLogger(__name__)

READ_ATTEMPTS = 5  # reads of one shard, inside its task, before a transient storage error ends the job
# A read task's own memory besides the images: the Ray worker with numpy, pyarrow, Pillow and Ray Data's
# runtime (measured: extraction of Flickr8k at 260 px peaked at 608 MiB against 518 MiB declared with 160).
WORKER_BASE_BYTES = 256 << 20
# Bytes per pixel while Pillow turns the largest image a task may decode into RGB: the decoded image in its
# widest mode (RGBA, I or F: 4 bytes) and its RGB copy (3 bytes) are alive together.
DECODE_BYTES_PER_PIXEL = 7
# Ray Data's margin over a task's peak: its issue detector asks for 1.25 x the peak it measured (the estimate
# below held the Flickr8k extraction's 566 MiB peak at 615 MiB, and Ray still warned).
MEMORY_HEADROOM = 1.25


def _raw_table(raws: list[RawImage]) -> pa.Table:
    return pa.table({
        "image_id": pa.array([r.image_id for r in raws], pa.string()),
        "source": pa.array([r.source for r in raws], pa.string()),
        "data": pa.array([r.data for r in raws], pa.binary()),
        "error": pa.array([r.error for r in raws], pa.string()),
    })


def shard_rows(shard: dict[str, Any], s3: S3Options, chunk: int) -> Iterator[pa.Table]:
    """Raw image rows (image_id, source, data, error) of one shard, `chunk` images at a time, each image once.

    A storage error still transient after the filesystem's own retries (`read_shard` raises it instead of
    making error rows) re-reads the shard after a pause, skipping the images already emitted, so every row
    leaves the task exactly once; after `READ_ATTEMPTS` it ends the job. The retry lives here, not in Ray's
    task retries, because Ray Data 2.60 deprecates the task options (`retry_exceptions`) that asked for them.
    """
    emitted: set[str] = set()
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            fault_point("read")
            for raws in read_shard(shard, s3, chunk):
                fresh = [r for r in raws if r.image_id not in emitted]
                emitted.update(r.image_id for r in fresh)
                if fresh:
                    yield _raw_table(fresh)
            return
        except OSError as exc:  # TransientReadError (or an injected one): everything else is an error row
            if attempt == READ_ATTEMPTS:
                raise
            log.warning("reading a shard of %d image(s) from %s failed (%s): read again (%d of %d)",
                        len(shard["image_id"]), shard["location"][0], exc, attempt + 1, READ_ATTEMPTS)
            time.sleep(min(10.0, 0.5 * 2 ** attempt))


def _read_shards(batch: pa.Table, s3: S3Options, chunk: int) -> Iterator[pa.Table]:
    """Ray Data task: shard rows -> raw image rows."""
    for shard in batch.to_pylist():
        yield from shard_rows(shard, s3, chunk)


def task_memory(options: ImagingOptions, images: int, thumbnail_size: int = 0) -> int:
    """Bytes a read + pixels task may use, which it declares to Ray: the worker itself, the largest image
    `options.max_pixels` lets it decode, and its batch of `images` pixel arrays (held twice while the
    output block is built) with their thumbnails, with Ray Data's headroom over that peak.

    Besides keeping the scheduler honest, this static remote arg differs from the CNN actors' args, and Ray
    Data only fuses a task map into the following actor map when their remote args are equal: so Pillow
    stays on CPU tasks that scale apart from the actor pool instead of running inside the actors.
    """
    pixels = options.size[0] * options.size[1] * 3
    thumbnail = 3 * thumbnail_size * thumbnail_size
    peak = WORKER_BASE_BYTES + DECODE_BYTES_PER_PIXEL * options.max_pixels + images * (2 * pixels + thumbnail)
    return int(MEMORY_HEADROOM * peak)


def pixels_dataset(refs: Sequence[ImageRef], options: ImagingOptions, s3: S3Options, shard_size: int,
                   thumbnail_size: int = 0) -> Any:
    """A Ray Dataset of `pixels_batch` rows for `refs`, read and turned into pixels by CPU tasks,
    `shard_size` images per task (one task per compressed tar), streamed: nothing is materialised, so memory
    stays flat in the number of images. A task that dies with its worker or node is run again by Ray Data
    (its default for tasks); its rows are emitted once either way."""
    import ray.data

    shards = plan_shards(refs, shard_size)
    memory = task_memory(options, shard_size, thumbnail_size)
    return (
        ray.data.from_items(shards, override_num_blocks=len(shards))
        .map_batches(_read_shards, fn_kwargs={"s3": s3, "chunk": min(32, shard_size)}, batch_size=1,
                     batch_format="pyarrow", num_cpus=1, memory=memory)
        .map_batches(pixels_batch, fn_kwargs={"options": options, "thumbnail_size": thumbnail_size},
                     batch_size=None, batch_format="pyarrow", num_cpus=1, memory=memory)
    )
