"""Storage: one way to reach local paths and URIs (pyarrow.fs), S3 options, retries of transient errors."""

from __future__ import annotations

import functools
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

T = TypeVar("T")


class StorageError(ValueError):
    """A location that is not a valid path or URI (an `s3://` URI without a bucket); the message names it."""


@dataclass(frozen=True)
class S3Options:
    """How to reach S3; every field None/False means the AWS SDK's defaults (env, profile, instance role)."""
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    anonymous: bool = False
    max_attempts: int = 10  # per request, AWS SDK standard retries

    @classmethod
    def from_config(cls, config: Any) -> "S3Options":
        """From a job's `[s3]` table (imgcap.config.jobs.S3Config)."""
        return cls(config.endpoint_url, config.region, config.profile, config.anonymous, config.max_attempts)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise StorageError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"s3 URI has no bucket: {uri}")
    return bucket, key


@functools.lru_cache(maxsize=16)
def _s3_filesystem(options: S3Options) -> Any:
    """One pyarrow S3FileSystem per process and options (the AWS SDK behind it is set up once).

    pyarrow's own URI parsing knows neither a custom endpoint nor a profile: the endpoint comes from `options`
    or AWS_ENDPOINT_URL(_S3), a profile's credentials are resolved through boto3, and otherwise the AWS SDK's
    default chain runs on every node (env, instance role).
    """
    endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {"anonymous": options.anonymous,
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts)}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region or endpoint:  # S3-compatible stores ignore the region; pyarrow would otherwise ask AWS for it
        kwargs["region"] = region or "us-east-1"
    if options.profile:
        import boto3

        credentials = boto3.session.Session(profile_name=options.profile).get_credentials().get_frozen_credentials()
        kwargs.update(access_key=credentials.access_key, secret_key=credentials.secret_key,
                      session_token=credentials.token)
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str, options: S3Options) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of a local path or a URI, for reading sources and for writing and
    resuming outputs: `s3://` with `options` applied, other URIs as pyarrow knows them (`gs://`, `hdfs://`)."""
    if uri.startswith("s3://"):
        split_s3_uri(uri)  # a clear error for a URI without a bucket
        return _s3_filesystem(options), uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


class _RandomAccessFile(io.RawIOBase):
    """A pyarrow random-access file under the `io` contract that `zipfile` relies on: pyarrow reports a seek
    before the start as ArrowInvalid, where zipfile expects OSError (it probes short files that way)."""
    def __init__(self, native: Any) -> None:
        super().__init__()
        self._native = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:

        try:
            return self._native.seek(offset, whence)
        except pa.ArrowInvalid as exc:
            raise OSError(f"invalid seek: {exc}") from None

    def tell(self) -> int:
        return self._native.tell()

    def readinto(self, buffer: Any) -> int:
        return self._native.readinto(buffer)

    def close(self) -> None:
        self._native.close()
        super().close()


def open_random_access(location: str, options: S3Options) -> IO[bytes]:
    """A seekable binary file for a local path or a URI, read by ranges through a 1 MiB buffer (zip central
    directories and tar members are read without downloading the whole archive)."""
    filesystem, path = filesystem_for(location, options)
    return io.BufferedReader(_RandomAccessFile(filesystem.open_input_file(path)), buffer_size=1 << 20)


def open_stream(location: str, options: S3Options) -> IO[bytes]:
    """A sequential binary stream for a local path or a URI (one request, read as it arrives)."""
    filesystem, path = filesystem_for(location, options)
    return filesystem.open_input_stream(path, compression=None)  # the bytes as stored: no .gz detection


def read_range(location: str, options: S3Options, offset: int | None = None, size: int | None = None) -> bytes:
    """The bytes of a whole file / object, or of `size` bytes at `offset` within it."""
    filesystem, path = filesystem_for(location, options)
    if offset is None:
        with filesystem.open_input_stream(path, compression=None) as stream:
            return stream.read()
    if not size:
        return b""
    with filesystem.open_input_file(path) as handle:
        return handle.read_at(size, offset)


class TransientReadError(OSError):
    """A read that failed with a transient storage error even after the filesystem's retries (see the module
    docstring): the whole shard is to be read again, not its images marked unreadable."""


# How pyarrow (the AWS SDK) words the S3 errors that are worth another try: the same set Ray Data retries its
# own file writes on (`DataContext.retried_io_errors`), plus throttling and timeouts. "Failed to flush response
# stream" is a 500/503 answered to a small ranged GET (a Parquet footer): the SDK writes the error's XML into
# the caller's buffer sized for the range, the stream overflows, and the SDK reports a non-retryable
# INTERNAL_FAILURE without the status (seen with imgcap/testing/flaky_s3.py; apache/doris#66557 tells the same story).
_TRANSIENT_ERRORS = ("AWS Error INTERNAL_FAILURE", "AWS Error NETWORK_CONNECTION", "AWS Error SLOW_DOWN",
                     "AWS Error SERVICE_UNAVAILABLE", "AWS Error THROTTLING", "HTTP status 500",
                     "HTTP status 503", "Failed to flush response stream", "Timeout", "Connection reset")


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth another try (see `_TRANSIENT_ERRORS`)."""
    return isinstance(exc, OSError) and any(marker in str(exc) for marker in _TRANSIENT_ERRORS)


def retry_transient(call: Callable[[], T], attempts: int = 5, first_wait_s: float = 0.2) -> T:
    """`call()`, again after a transient storage error, up to `attempts` times with doubling waits. For the
    driver's reads of outputs: the AWS SDK retries a request, but not a response stream that breaks mid-body
    ("Failed to flush response stream"), which pyarrow then raises as INTERNAL_FAILURE."""
    for attempt in range(attempts - 1):
        try:
            return call()
        except OSError as exc:
            if not is_transient(exc):
                raise
            time.sleep(first_wait_s * 2 ** attempt)
    return call()
