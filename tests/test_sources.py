"""Listing and reading image sources on local disk: directories, list files, archives, bad files."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from _imaging import jpeg_bytes, write_bad_inputs, write_jpegs

from imgcap.io.sources import (
    SourceError,
    check_unique_ids,
    list_source,
    plan_shards,
    read_shard,
)
from imgcap.io.storage import S3Options

NO_S3 = S3Options()


def read_all(refs, shard_size=3):
    """{image_id: (data, error)} for refs, read shard by shard as the Ray tasks do."""
    out = {}
    for shard in plan_shards(refs, shard_size):
        for chunk in read_shard(shard, NO_S3, chunk=2):
            for raw in chunk:
                assert raw.image_id not in out
                out[raw.image_id] = (raw.data, raw.error)
    return out


def make_archives(root: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """The same members as .tar, .tar.gz and .zip."""
    paths = {}
    for suffix, mode in ((".tar", "w"), (".tar.gz", "w:gz")):
        path = root / f"bundle{suffix}"
        with tarfile.open(path, mode) as archive:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        paths[suffix] = path
    path = root / "bundle.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    paths[".zip"] = path
    return paths


def test_directory_is_recursive_case_insensitive_and_skips_hidden_and_other_files(tmp_path):
    write_jpegs(tmp_path, 2)
    write_jpegs(tmp_path / "sub" / "deeper", 1, prefix="deep")
    (tmp_path / "UPPER.JPG").write_bytes(jpeg_bytes(5))
    (tmp_path / "._img0000.jpg").write_bytes(b"resource fork")  # macOS junk, hidden
    (tmp_path / "notes.txt").write_text("x")
    refs = list_source(str(tmp_path), NO_S3)
    assert sorted(r.image_id for r in refs) == ["UPPER", "deep0000", "img0000", "img0001"]
    assert {r.source for r in refs if r.image_id == "deep0000"} == {str(tmp_path / "sub/deeper/deep0000.jpg")}
    flat = list_source(str(tmp_path), NO_S3, recursive=False)
    assert sorted(r.image_id for r in flat) == ["UPPER", "img0000", "img0001"]
    only_png = list_source(str(tmp_path), NO_S3, extensions=[".png"])
    assert only_png == []


def test_relpath_ids_and_collisions_are_an_error_not_a_silent_drop(tmp_path):
    write_jpegs(tmp_path / "a", 1)
    write_jpegs(tmp_path / "b", 1)
    (tmp_path / "b" / "img0000.png").write_bytes(b"a png beside the jpg of the same name")
    refs = list_source(str(tmp_path), NO_S3)
    with pytest.raises(SourceError, match=r"2 image id collision.*img0000.*a/img0000.jpg and .*b/img0000.*"
                                          r"set id_from = \"relpath\""):
        check_unique_ids(refs)
    rel = list_source(str(tmp_path), NO_S3, id_from="relpath")
    check_unique_ids(rel, "relpath")  # the extension is kept: b/img0000.jpg and b/img0000.png are two images
    assert sorted(r.image_id for r in rel) == ["a/img0000.jpg", "b/img0000.jpg", "b/img0000.png"]
    # Two sources with the same relative paths collide under relpath; the message names what cannot collide.
    twice = list_source(str(tmp_path / "a"), NO_S3, id_from="relpath") * 2
    with pytest.raises(SourceError, match=r"img0000.jpg.*set id_from = \"uri\""):
        check_unique_ids(twice, "relpath")
    uri = list_source(str(tmp_path), NO_S3, id_from="uri")
    assert sorted(r.image_id for r in uri) == sorted(r.source for r in uri) and len(uri) == 3


def test_list_file_resolves_relative_lines_and_skips_comments(tmp_path):
    images = write_jpegs(tmp_path / "pics", 3)
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "train.txt"
    listing.write_text(f"# training images\n\n../pics/img0000.jpg\n  {images[1]}  \n../pics/missing.jpg\n")
    refs = list_source(str(listing), NO_S3)
    assert [r.image_id for r in refs] == ["img0000", "img0001", "missing"]
    assert refs[0].location == str(images[0].resolve())
    got = read_all(refs)
    assert got["img0000"] == (images[0].read_bytes(), "")
    assert got["missing"][0] is None and got["missing"][1].startswith("unreadable: FileNotFoundError")


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".zip"])
def test_archives_list_and_read_members_without_unpacking(tmp_path, suffix):
    files = {f"set/{i}.jpg": jpeg_bytes(i) for i in range(5)}
    files["set/readme.md"] = b"not listed"
    files["__MACOSX/set/._0.jpg"] = b"junk"
    archive = make_archives(tmp_path, files)[suffix]
    refs = list_source(str(archive), NO_S3)
    assert [r.image_id for r in refs] == ["0", "1", "2", "3", "4"]
    assert refs[0].source == f"{archive}!set/0.jpg"
    expected_mode = {".tar": "files", ".tar.gz": "tar_stream", ".zip": "zip"}[suffix]
    assert {r.mode for r in refs} == {expected_mode}
    shards = plan_shards(refs, shard_size=2)
    assert len(shards) == (1 if suffix == ".tar.gz" else 3)  # a compressed tar is one sequential read
    got = read_all(refs)
    assert got == {str(i): (files[f"set/{i}.jpg"], "") for i in range(5)}


def test_directory_with_archives_included(tmp_path):
    write_jpegs(tmp_path, 1)
    (tmp_path / "arch").mkdir()
    make_archives(tmp_path / "arch", {"x/in_archive.jpg": jpeg_bytes(1)})
    assert [r.image_id for r in list_source(str(tmp_path), NO_S3)] == ["img0000"]
    refs = list_source(str(tmp_path), NO_S3, include_archives=True)
    assert sorted(r.source.split("/arch/")[-1] for r in refs if "!" in r.source) == [
        "bundle.tar!x/in_archive.jpg", "bundle.tar.gz!x/in_archive.jpg", "bundle.zip!x/in_archive.jpg"]
    with pytest.raises(SourceError, match="2 image id collision"):  # one member name in three archives
        check_unique_ids(refs)


def test_bad_files_are_listed_and_read_as_error_rows(tmp_path):
    write_jpegs(tmp_path, 1)
    expected = write_bad_inputs(tmp_path)
    (tmp_path / "folder.jpg").mkdir()  # a directory named like an image is a directory, not an image
    refs = list_source(str(tmp_path), NO_S3)
    assert sorted(r.image_id for r in refs) == sorted([*expected, "img0000"])
    got = read_all(refs)
    assert got["dangling"][0] is None and got["dangling"][1].startswith("unreadable: FileNotFoundError")
    assert got["zero"] == (b"", "")  # read fine; decoding reports it as empty
    assert got["img0000"][1] == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_is_an_error_row(tmp_path):
    (path,) = write_jpegs(tmp_path, 1)
    path.chmod(0)
    got = read_all(list_source(str(tmp_path), NO_S3))
    assert got["img0000"][1].startswith("unreadable: PermissionError")


def test_corrupt_archive_is_a_clear_error_and_damaged_stream_fails_only_unread_members(tmp_path):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK not really a zip")
    with pytest.raises(SourceError, match="cannot list archive .*broken.zip"):
        list_source(str(bad), NO_S3)
    # A tar.gz that loses its tail after listing: members before the damage are read, the rest are errors.
    archive = make_archives(tmp_path, {f"{i}.jpg": jpeg_bytes(i, 256, 256, quality=100) for i in range(6)})[".tar.gz"]
    refs = list_source(str(archive), NO_S3)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    got = read_all(refs)
    ok = [i for i, (d, e) in got.items() if not e]
    failed = [i for i, (d, e) in got.items() if e]
    assert ok and failed and len(got) == 6
    assert all(got[i][1].startswith("unreadable:") for i in failed)


def test_unknown_and_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="source not found"):
        list_source(str(tmp_path / "nope"), NO_S3)
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    with pytest.raises(SourceError, match="cannot tell what .*data.csv is"):
        list_source(str(odd), NO_S3)
