"""Outputs: where jobs write, on a local path or any pyarrow filesystem URI (``s3://`` included).

`OutputDirectory` is the one resumable Parquet directory both Ray Data jobs write (extraction's features,
the captioning job's captions): it scans what earlier runs wrote (image ids done, half-written files set
aside in ``_incomplete/``), refuses to mix rows made another way, writes a run's rows under a run-unique file
prefix, and counts what that run wrote. Every output row keeps its `image_id` and `source` URI.

Ray Data is imported inside `write` on purpose: reading and scanning outputs needs no Ray.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from imgcap.io.storage import S3Options, filesystem_for, is_transient, retry_transient

INCOMPLETE_DIR = "_incomplete"  # where unreadable Parquet files of an interrupted run are moved
_FAILURE_EXAMPLES = 5


@dataclass(frozen=True)
class WrittenRows:
    """What one run wrote: rows with and without an error, and the first few errors."""

    files: int
    ok: int
    failed: int
    failures: tuple[tuple[str, str], ...] = ()  # the first few (image_id, error)


class OutputDirectory:
    """A directory (local path or URI) of Parquet files that a job appends to and resumes from, and of the
    sidecar files written next to them (``_embedding.json``, reports)."""

    def __init__(self, uri: str, s3: S3Options) -> None:
        self.uri = uri
        self.filesystem, self.path = filesystem_for(uri, s3)

    def files(self) -> list[str]:
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        infos = self.filesystem.get_file_info(selector)
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                      and not i.base_name.startswith(("_", ".")))

    def scan(self, expect: dict[str, str] | None = None) -> tuple[set[str], int]:
        """Image ids already written, and how many unreadable files of an interrupted run were set aside.

        A Parquet file is only readable once its footer is written, so a file a killed run left half-written
        fails to open: it is moved to ``_incomplete/`` (ignored by readers) and its images count as not done.
        `expect` ({column: value}) refuses a directory holding rows made another way (another backbone,
        bundle or decoding) rather than mixing them.
        """
        done: set[str] = set()
        moved = 0
        columns = ["image_id", *(expect or {})]
        for path in self.files():
            try:
                table = self.read_table(path, columns=columns)
            except (OSError, pa.ArrowException) as exc:
                if is_transient(exc):  # the store failing, not the file: never set a good file aside
                    raise
                self.filesystem.create_dir(f"{self.path}/{INCOMPLETE_DIR}")
                self.filesystem.move(path, f"{self.path}/{INCOMPLETE_DIR}/{path.rsplit('/', 1)[-1]}")
                moved += 1
                continue
            for column, value in (expect or {}).items():
                others = set(pc.unique(table[column]).to_pylist()) - {value, None}
                if others:
                    raise FileExistsError(f"{self.uri} holds rows with {column} {sorted(others)}, not {value!r}: "
                                          f"use another output directory")
            done.update(table["image_id"].to_pylist())
        return done, moved

    def write(self, dataset: Any, schema: pa.Schema, rows_per_file: int) -> WrittenRows:
        """Write a Ray Dataset's rows as files of at most `rows_per_file` rows under a run-unique prefix (so a
        rerun never overwrites a file), then count what was written, from the files themselves."""
        from ray.data.datasource import FilenameProvider

        run_id = f"run{time.strftime('%Y%m%d%H%M%S')}{uuid.uuid4().hex[:8]}"
        self.filesystem.create_dir(self.path)
        # Write tasks ask for no CPU: encoding Parquet is light, and a writer that waits for a CPU slot behind
        # the CPU-bound read tasks and CNN actors (on a 2-CPU node: until the reads are done) lets every
        # finished row pile up in the object store instead of streaming to the files.
        dataset.write_parquet(self.path, filesystem=self.filesystem,
                              filename_provider=FilenameProvider(dataset_uuid=run_id, file_format="parquet"),
                              min_rows_per_file=rows_per_file, max_rows_per_file=rows_per_file, schema=schema,
                              ray_remote_args={"num_cpus": 0})
        written = [p for p in self.files() if p.rsplit("/", 1)[-1].startswith(f"{run_id}_")]
        ok = failed = 0
        failures: list[tuple[str, str]] = []
        for path in written:
            table = self.read_table(path, columns=["image_id", "error"])
            bad = table.filter(pc.is_valid(table["error"]))
            failed += bad.num_rows
            ok += table.num_rows - bad.num_rows
            examples = bad.slice(0, max(0, _FAILURE_EXAMPLES - len(failures)))
            failures += list(zip(examples["image_id"].to_pylist(), examples["error"].to_pylist()))
        return WrittenRows(len(written), ok, failed, tuple(failures))

    def read(self, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        """Every row written so far (all runs) as `schema` (`columns` only, when given); empty if none."""
        files = self.files()
        if not files:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        return pa.concat_tables([self.read_table(f, columns=columns, schema=schema)
                                 for f in files])

    def read_table(self, path: str, **options: Any) -> pa.Table:
        """One Parquet file of this directory (a path from `files`), retried over transient storage errors."""
        return retry_transient(lambda: pq.read_table(path, filesystem=self.filesystem, **options))

    def write_file(self, name: str, data: bytes) -> str:
        """Write one whole file next to the Parquet files (a sidecar); returns its path in the filesystem."""
        self.filesystem.create_dir(self.path)
        path = f"{self.path}/{name}"
        with self.filesystem.open_output_stream(path) as out:
            out.write(data)
        return path

    def read_file(self, name: str) -> bytes | None:
        """A sidecar file's bytes, or None when it does not exist."""
        path = f"{self.path}/{name}"
        if self.filesystem.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.filesystem.open_input_stream(path) as stream:
            return stream.read()

    def clear(self) -> None:
        """Delete every file (the directory stays): for outputs that belong to a model just replaced."""
        if self.filesystem.get_file_info(self.path).type == pafs.FileType.Directory:
            self.filesystem.delete_dir_contents(self.path)


