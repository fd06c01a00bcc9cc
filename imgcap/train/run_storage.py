"""Where a Ray Train run lives: its storage (local or URI), its stable name, and a check that it is writable."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow.fs as pafs

from imgcap.config.loader import ConfigError
from imgcap.config.training import TrainJobConfig
from imgcap.io.storage import S3Options, filesystem_for

# Ray Train V2's record of a run's checkpoints in the run directory (CHECKPOINT_MANAGER_SNAPSHOT_FILENAME in
# ray/train/v2/_internal/constants.py); a run directory with it is restored by a run of the same name.
RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def is_local(path: str | None) -> bool:
    return bool(path) and "://" not in path


def resolve_storage(location: str, endpoint_url: str | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) of a local path or a URI; `endpoint_url`: an S3-compatible store."""
    return filesystem_for(location.split("?", 1)[0], S3Options(endpoint_url=endpoint_url))


def path_exists(filesystem: Any, path: str, kind: str = "any") -> bool:

    found = filesystem.get_file_info(path).type
    if kind == "file":
        return found == pafs.FileType.File
    if kind == "dir":
        return found == pafs.FileType.Directory
    return found != pafs.FileType.NotFound


@dataclass(frozen=True)
class RunLocation:
    """Where the job's Ray Train run lives: its storage (a pyarrow filesystem and a path on it) and name."""
    filesystem: Any  # pyarrow.fs.FileSystem
    storage_path: str  # on `filesystem`: a local absolute path, or a URI without its scheme (bucket/prefix)
    name: str
    storage_uri: str  # as configured: a local path or a URI (for messages)

    @property
    def local(self) -> bool:
        return is_local(self.storage_uri)

    @property
    def path(self) -> str:
        """The run directory on `filesystem`."""
        return f"{self.storage_path}/{self.name}"

    @property
    def uri(self) -> str:
        """The run directory as the user would write it."""
        return self.display(self.path)

    def display(self, fs_path: str) -> str:
        """A path on `filesystem` as a local path or a URI (``s3://bucket/...``)."""
        if self.local:
            return fs_path
        return f"{self.storage_uri.partition('://')[0]}://{fs_path}"


def default_run_name(output_dir: str) -> str:
    """The stable run name of a job: ``train-<output_dir name>-<8 hex of a hash of the resolved output_dir>``;
    the same job run again gets the same name and so continues its run."""
    target = Path(output_dir).resolve().as_posix() if is_local(output_dir) else output_dir.rstrip("/")
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", PurePosixPath(target.partition("://")[2] or target).name) or "output"
    return f"train-{base}-{hashlib.sha256(target.encode('utf-8')).hexdigest()[:8]}"


def run_location(config: TrainJobConfig) -> RunLocation:
    """The job's storage and run name (``ray.storage_path``, ``ray.run_name``); a URI that pyarrow cannot
    resolve is a `ConfigError` naming ``ray.storage_path``."""
    storage = config.ray.storage_path or str(Path(config.output_dir).resolve() / "ray_results")
    name = config.ray.run_name or default_run_name(config.output_dir)
    try:
        filesystem, path = resolve_storage(storage, config.ray.storage_endpoint_url)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for unknown schemes and unreachable stores
        raise ConfigError(f"ray.storage_path: cannot open {storage}: {exc}; set ray.storage_path to a local "
                          f"directory or a URI that pyarrow.fs.FileSystem.from_uri accepts (s3://bucket/prefix; "
                          f"ray.storage_endpoint_url for an S3-compatible store)") from None
    return RunLocation(filesystem, path, name, storage)


def check_storage(run: RunLocation) -> None:
    """The run directory must be reachable and writable before any worker starts (Ray Train would only fail
    in its controller). A URI: the run directory is created and a probe object written, read back and
    deleted. A local path: nothing is created yet (the config may still be invalid); the storage directory,
    or the nearest directory above it that exists, must be writable."""
    probe = f"{run.path}/.imgcap_probe_{uuid.uuid4().hex}"
    try:
        if run.local:
            existing = Path(run.storage_path)
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
                raise OSError(f"{existing} is not a writable directory")
        else:
            run.filesystem.create_dir(run.path, recursive=True)
            with run.filesystem.open_output_stream(probe) as f:
                f.write(b"imgcap storage probe\n")
            if not path_exists(run.filesystem, probe, "file"):
                raise OSError(f"the probe object {run.display(probe)} was written but cannot be found")
            run.filesystem.delete_file(probe)
    except Exception as exc:
        raise ConfigError(f"ray.storage_path: cannot write the run {run.name} to {run.storage_uri}: {exc}; set "
                          f"ray.storage_path to a reachable, writable directory or URI (an existing bucket; "
                          f"ray.storage_endpoint_url for an S3-compatible store)") from None
