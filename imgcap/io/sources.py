"""Image sources: local directories, list files, archives (``.tar``, ``.tar.gz``, ``.zip``) and ``s3://``
prefixes, listed into `ImageRef`s on the driver (ids, unique per job) and read shard by shard in Ray tasks
(archive members in place, by byte range where the archive allows). A bad image or archive becomes an error
row; only a storage error still transient after the filesystem's retries is raised (`TransientReadError`).
What a source path means and how ids are made: docs/captioning.md; storage errors: docs/faults.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
import tarfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs

from imgcap.io.storage import (
    S3Options,
    StorageError,
    TransientReadError,
    filesystem_for,
    is_transient,
    open_random_access,
    open_stream,
    read_range,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
LIST_SUFFIXES = (".txt", ".lst", ".list")
# First bytes of gzip, bzip2 and xz streams: a tar starting with one of these cannot be read by byte range.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")

ShardMode = Literal["files", "zip", "tar_stream"]


class SourceError(StorageError):
    """A source cannot be listed (missing, unknown kind, id collision); the message names it."""


@dataclass(frozen=True)
class ImageRef:
    """One image to extract: its id, its source URI, and where its bytes are.

    `location` is a local path or `s3://` URI of the file holding the bytes (the image itself or an archive);
    `member` names the archive member; `offset`/`size` give a byte range inside `location` (uncompressed tar
    members) and are None for a whole file.
    """
    image_id: str
    source: str
    location: str
    member: str | None = None
    offset: int | None = None
    size: int | None = None
    mode: ShardMode = "files"


@dataclass(frozen=True)
class RawImage:
    """The bytes read for one image, or None and an error message saying why they could not be read."""
    image_id: str
    source: str
    data: bytes | None
    error: str = ""


# ---------------------------------------------------------------------------------------------- S3 access


# ---------------------------------------------------------------------------------------------- listing


def _is_image_name(name: str, extensions: Sequence[str]) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and base.lower().endswith(tuple(extensions))


def _is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _image_id(relative: str, id_from: str, source: str) -> str:
    """Image id of the image at `source`, `relative` to its source root (see the module docstring)."""
    if id_from == "uri":
        return source
    relative = relative.replace(os.sep, "/").lstrip("/")
    return relative if id_from == "relpath" else posixpath.splitext(posixpath.basename(relative))[0]


def _join(base: str, relative: str) -> str:
    """`relative` (a line of a list file) resolved against the directory `base` (local or s3://)."""
    if relative.startswith("s3://") or os.path.isabs(relative):
        return relative
    if base.startswith("s3://"):
        return posixpath.normpath(posixpath.join(base, relative)).replace("s3:/", "s3://", 1)
    return str(Path(base, relative).resolve())


def _is_compressed(location: str, options: S3Options) -> bool:
    with open_stream(location, options) as head:
        magic = head.read(6)
    return magic.startswith(_COMPRESSED_MAGIC)


def list_archive(location: str, options: S3Options, id_from: str = "stem",
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[ImageRef]:
    """Image members of a tar / tar.gz / zip archive (local or S3), in archive order."""
    refs = []
    try:
        if location.lower().endswith(".zip"):
            with open_random_access(location, options) as handle, zipfile.ZipFile(handle) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and _is_image_name(info.filename, extensions) \
                            and not info.filename.startswith("__MACOSX/"):
                        refs.append(ImageRef(_image_id(info.filename, id_from, f"{location}!{info.filename}"), f"{location}!{info.filename}",
                                             location, member=info.filename, mode="zip"))
            return refs
        compressed = _is_compressed(location, options)
        # Local archives are opened seekable, so listing an uncompressed tar skips member data.
        with contextlib.ExitStack() as stack:
            if location.startswith("s3://"):
                stream = stack.enter_context(open_stream(location, options))
                archive = stack.enter_context(tarfile.open(fileobj=stream, mode="r|*"))
            else:
                archive = stack.enter_context(tarfile.open(location, "r:*"))
            for member in archive:
                if member.isfile() and _is_image_name(member.name, extensions):
                    ref = ImageRef(_image_id(member.name, id_from, f"{location}!{member.name}"), f"{location}!{member.name}", location,
                                   member=member.name)
                    refs.append(dataclasses.replace(ref, mode="tar_stream") if compressed else
                                dataclasses.replace(ref, offset=member.offset_data, size=member.size))
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise SourceError(f"cannot list archive {location}: {type(exc).__name__}: {exc}") from exc
    return refs


def _list_directory(root: Path, recursive: bool, extensions: Sequence[str], include_archives: bool,
                    id_from: str, options: S3Options) -> Iterator[ImageRef]:
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            path = Path(directory, name)
            if include_archives and _is_archive(name):
                yield from list_archive(str(path), options, id_from, extensions)
            elif _is_image_name(name, extensions):
                yield ImageRef(_image_id(str(path.relative_to(root)), id_from, str(path)), str(path), str(path))


def _list_s3_prefix(uri: str, recursive: bool, extensions: Sequence[str], include_archives: bool,
                    id_from: str, options: S3Options) -> Iterator[ImageRef]:

    filesystem, root = filesystem_for(uri, options)
    bucket = root.split("/", 1)[0]
    try:
        # An empty prefix lists nothing, but a missing bucket is a mistake to name, not an empty source.
        if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise SourceError(f"cannot list {uri}: bucket {bucket!r} does not exist")
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    except OSError as exc:  # access denied, unreachable endpoint
        raise SourceError(f"cannot list {uri}: {exc}") from exc
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        location = f"s3://{info.path}"
        if include_archives and _is_archive(info.path):
            yield from list_archive(location, options, id_from, extensions)
        elif _is_image_name(info.path, extensions):
            yield ImageRef(_image_id(info.path[len(root) + 1:], id_from, location), location, location)


def _list_file(path: str, options: S3Options, id_from: str, extensions: Sequence[str]) -> Iterator[ImageRef]:
    try:
        text = read_range(path, options).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read list file {path}: {exc}") from exc
    base = posixpath.dirname(path) if path.startswith("s3://") else str(Path(path).parent)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        target = _join(base, line)
        if _is_archive(target):
            yield from list_archive(target, options, id_from, extensions)
        else:
            yield ImageRef(_image_id(line, id_from, target), target, target)


def list_source(path: str, options: S3Options, *, recursive: bool = True, include_archives: bool = False,
                extensions: Sequence[str] = IMAGE_EXTENSIONS, id_from: str = "stem") -> list[ImageRef]:
    """Every image of one source (see the module docstring for how `path` is interpreted)."""
    extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if path.startswith("s3://"):
        if _is_archive(path):
            return list_archive(path, options, id_from, extensions)
        if path.lower().endswith(LIST_SUFFIXES):
            return list(_list_file(path, options, id_from, extensions))
        if path.lower().endswith(extensions):
            return [ImageRef(_image_id(posixpath.basename(path), id_from, path), path, path)]
        return list(_list_s3_prefix(path, recursive, extensions, include_archives, id_from, options))
    local = Path(path)
    if local.is_dir():
        return list(_list_directory(local, recursive, extensions, include_archives, id_from, options))
    if not local.exists():
        raise SourceError(f"source not found: {path}")
    if _is_archive(path):
        return list_archive(path, options, id_from, extensions)
    if path.lower().endswith(LIST_SUFFIXES):
        return list(_list_file(str(local.resolve()), options, id_from, extensions))
    if path.lower().endswith(extensions):
        return [ImageRef(_image_id(local.name, id_from, path), path, path)]
    raise SourceError(f"cannot tell what {path} is: expected a directory, an archive ({', '.join(ARCHIVE_SUFFIXES)}),"
                      f" a list file ({', '.join(LIST_SUFFIXES)}) or an image ({', '.join(extensions)})")


def check_unique_ids(refs: Iterable[ImageRef], id_from: str = "stem") -> None:
    """Raise SourceError naming colliding image ids (two images, one id) instead of dropping either; the
    message names the `id_from` that cannot collide for these images."""
    first: dict[str, str] = {}
    collisions = []
    for ref in refs:
        if ref.image_id in first:
            collisions.append(f"{ref.image_id!r}: {first[ref.image_id]} and {ref.source}")
        else:
            first[ref.image_id] = ref.source
    if collisions:
        shown = "; ".join(collisions[:5])
        fix = {"stem": "set id_from = \"relpath\" (paths relative to each source, extension kept) or \"uri\"",
               "relpath": "set id_from = \"uri\" (the whole source URI: unique across sources)"}.get(id_from)
        raise SourceError(f"{len(collisions)} image id collision(s): {shown}"
                          f"{' ...' if len(collisions) > 5 else ''}. Image ids must be unique: rename or remove"
                          f" the duplicates{', or ' + fix if fix else ''}")


def list_images(sources: Sequence[Any], options: S3Options, extensions: Sequence[str], id_from: str) -> list[ImageRef]:
    """Every image of a job's `sources` (imgcap.config.jobs.SourceConfig), checked for unique ids."""
    refs = [ref for source in sources
            for ref in list_source(source.path, options, recursive=source.recursive,
                                   include_archives=source.include_archives, extensions=extensions,
                                   id_from=id_from)]
    check_unique_ids(refs, id_from)
    return refs


# ---------------------------------------------------------------------------------------------- shards


def plan_shards(refs: Sequence[ImageRef], shard_size: int) -> list[dict[str, Any]]:
    """Group refs into read tasks: `shard_size` files or random-access members each; one task per
    compressed tar (it can only be read from the start). Each shard is a Ray Data row of typed columns: the
    `mode` string and one list per ref field (`image_id`, `source`, `location`, `member`, `offset`, `size`)."""
    groups: dict[tuple[str, str], list[ImageRef]] = {}
    for ref in refs:
        key = ("files", "") if ref.mode == "files" else (ref.mode, ref.location)
        groups.setdefault(key, []).append(ref)
    shards = []
    for (mode, _), members in groups.items():
        step = len(members) if mode == "tar_stream" else shard_size
        for start in range(0, len(members), step):
            chunk = members[start:start + step]
            shards.append({"mode": mode, **{name: [getattr(r, name) for r in chunk] for name in _SHARD_FIELDS}})
    return shards


_SHARD_FIELDS = ("image_id", "source", "location", "member", "offset", "size")


def _permanent_error(exc: BaseException) -> str:
    """The error row's text for an image that cannot be read for good; a transient failure is raised again as
    `TransientReadError` instead (it must not become a row)."""
    if is_transient(exc):
        raise TransientReadError(f"transient storage error (the shard is read again): {exc}") from exc
    return f"unreadable: {type(exc).__name__}: {exc}"


def read_shard(shard: dict[str, Any], options: S3Options, chunk: int = 32) -> Iterator[list[RawImage]]:
    """Read the bytes of every image of a shard, `chunk` images at a time. A bad image or a bad archive becomes
    RawImage rows with `data=None` and an error message; only a transient storage error raises
    (`TransientReadError`: read the shard again)."""
    refs = [ImageRef(*fields, mode=shard["mode"]) for fields in zip(*(shard[name] for name in _SHARD_FIELDS))]
    out: list[RawImage] = []
    emitted: set[str] = set()

    def emit(ref: ImageRef, data: bytes | None, error: str = "") -> Iterator[list[RawImage]]:
        emitted.add(ref.image_id)
        out.append(RawImage(ref.image_id, ref.source, data, error))
        if len(out) >= chunk:
            yield out.copy()
            out.clear()

    if shard["mode"] == "files":
        for ref in refs:
            try:
                data = read_range(ref.location, options, ref.offset, ref.size)
            except Exception as exc:  # any failure to read one file is that image's error row
                yield from emit(ref, None, _permanent_error(exc))
            else:
                yield from emit(ref, data)
    elif shard["mode"] == "zip":
        try:
            with open_random_access(refs[0].location, options) as handle, \
                    zipfile.ZipFile(handle) as archive:
                for ref in refs:
                    try:
                        data = archive.read(ref.member)
                    except Exception as exc:  # a corrupt member fails alone
                        yield from emit(ref, None, _permanent_error(exc))
                    else:
                        yield from emit(ref, data)
        except Exception as exc:  # the archive itself is unreadable: every image not yet emitted fails
            for ref in refs:
                if ref.image_id not in emitted:
                    yield from emit(ref, None, _permanent_error(exc))
    else:
        wanted = {ref.member: ref for ref in refs}
        try:
            with open_stream(refs[0].location, options) as stream, \
                    tarfile.open(fileobj=stream, mode="r|*") as archive:
                for member in archive:
                    ref = wanted.pop(member.name, None)
                    if ref is None:
                        continue
                    try:
                        data = archive.extractfile(member).read()
                    except Exception as exc:
                        yield from emit(ref, None, _permanent_error(exc))
                    else:
                        yield from emit(ref, data)
            for ref in list(wanted.values()):
                yield from emit(ref, None, "unreadable: member not found in archive")
        except Exception as exc:  # truncated / corrupt stream: the members not reached fail
            for ref in list(wanted.values()):
                yield from emit(ref, None, _permanent_error(exc))
    if out:
        yield out
