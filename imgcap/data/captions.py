"""Caption files and splits: the text side of a dataset.

Readers for the four common layouts, all returning a `CaptionCorpus` keyed by image id (the image file name
without its extension, e.g. ``1000268201_693b08cb0e``):

- ``flickr8k``: ``Flickr8k.token.txt`` lines ``<image>.jpg#<n>\\t<caption>``
- ``csv``: the Kaggle ``captions.txt`` (``image,caption`` header; quoted fields may hold commas)
- ``coco``: COCO ``captions_*.json`` (``images`` with ``file_name``, ``annotations`` with ``caption``)
- ``karpathy``: Karpathy's ``dataset_*.json`` (``images`` with ``filename``, ``split`` and ``sentences``);
  it carries its own train/val/test split

A malformed line or record raises `CaptionFormatError` naming the file and line (or record). With
``skip_malformed=True`` it is skipped instead and counted in ``CaptionCorpus.skipped`` (and logged), so a
loss is never silent.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

log = logging.getLogger(__name__)

CaptionFormat = Literal["auto", "flickr8k", "csv", "coco", "karpathy"]
_IMAGE_NAME = re.compile(r"^[^\s/\\]+\.(jpe?g|png|bmp|gif|webp|tiff?)$", re.IGNORECASE)


class CaptionFormatError(ValueError):
    """A caption or split file does not have the expected layout; the message names file and line."""


@dataclass
class CaptionCorpus:
    """Raw captions per image id, the splits the file itself defines (Karpathy only) and skipped lines."""

    captions: dict[str, list[str]]
    splits: dict[str, list[str]] = field(default_factory=dict)
    skipped: int = 0

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions.values())


def image_id(name: str) -> str:
    """The id of an image file name or path: its base name without extension."""
    return PurePosixPath(name.replace("\\", "/")).stem


class _Collector:
    """Accumulates captions, turning malformed records into errors or counted skips."""

    def __init__(self, path: Path, skip_malformed: bool) -> None:
        self.path, self.skip_malformed = path, skip_malformed
        self.corpus = CaptionCorpus({})

    def add(self, name: str, caption: str) -> None:
        self.corpus.captions.setdefault(image_id(name), []).append(caption.strip())

    def malformed(self, where: str, why: str) -> None:
        message = f"{self.path}:{where}: {why}"
        if not self.skip_malformed:
            raise CaptionFormatError(message + " (set data.skip_malformed = true to skip such lines)")
        self.corpus.skipped += 1
        log.warning("skipped malformed caption record: %s", message)

    def check(self, where: str, name: str, caption: str) -> bool:
        """Whether a record is well formed; reports it as malformed if not."""
        if not _IMAGE_NAME.match(name):
            self.malformed(where, f"{name!r} is not an image file name")
            return False
        if not caption.strip():
            self.malformed(where, f"empty caption for {name!r}")
            return False
        return True


def _read_flickr8k(path: Path, out: _Collector) -> None:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            if not sep:
                out.malformed(str(number), "expected '<image>.jpg#<n><TAB><caption>'")
                continue
            name, hash_sign, n = key.partition("#")
            if not hash_sign or not n.isdigit():
                out.malformed(str(number), f"key {key!r} is not '<image>.jpg#<n>'")
                continue
            if out.check(str(number), name, caption):
                out.add(name, caption)


def _read_csv(path: Path, out: _Collector) -> None:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header] != ["image", "caption"]:
            raise CaptionFormatError(f"{path}:1: expected the header 'image,caption', got {header!r}")
        for row in reader:
            where = str(reader.line_num)
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 2:
                out.malformed(where, f"expected 2 fields (image,caption), got {len(row)}; quote captions with commas")
                continue
            name, caption = row[0].strip(), row[1]
            if out.check(where, name, caption):
                out.add(name, caption)


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CaptionFormatError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CaptionFormatError(f"{path}: expected a JSON object with an 'images' list")
    return data


def _read_coco(path: Path, out: _Collector) -> None:
    data = _load_json(path)
    if not isinstance(data.get("annotations"), list):
        raise CaptionFormatError(f"{path}: COCO captions need an 'annotations' list")
    names = {}
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            out.malformed(f"images[{k}]", "an image needs 'id' and 'file_name'")
            continue
        names[image["id"]] = image["file_name"]
    for k, note in enumerate(data["annotations"]):
        where = f"annotations[{k}]"
        if not isinstance(note, dict) or not isinstance(note.get("caption"), str):
            out.malformed(where, "an annotation needs 'image_id' and a string 'caption'")
            continue
        if note.get("image_id") not in names:
            out.malformed(where, f"image_id {note.get('image_id')!r} is not in 'images'")
            continue
        if out.check(where, names[note["image_id"]], note["caption"]):
            out.add(names[note["image_id"]], note["caption"])


def _read_karpathy(path: Path, out: _Collector) -> None:
    data = _load_json(path)
    for k, image in enumerate(data["images"]):
        where = f"images[{k}]"
        if not isinstance(image, dict) or "filename" not in image or not isinstance(image.get("sentences"), list):
            out.malformed(where, "an image needs 'filename' and a 'sentences' list")
            continue
        name = image["filename"]
        kept = 0
        for s, sentence in enumerate(image["sentences"]):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if raw is None and isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
                raw = " ".join(sentence["tokens"])
            if not isinstance(raw, str):
                out.malformed(f"{where}.sentences[{s}]", "a sentence needs 'raw' or 'tokens'")
                continue
            if out.check(f"{where}.sentences[{s}]", name, raw):
                out.add(name, raw)
                kept += 1
        if kept:
            # Karpathy's "restval" images are training images in every published use of the split.
            split = {"restval": "train", "val": "dev"}.get(image.get("split", "train"), image.get("split", "train"))
            out.corpus.splits.setdefault(split, []).append(image_id(name))


def detect_format(path: str | Path) -> CaptionFormat:
    """Guess a caption file's layout from its name and first bytes."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        with path.open(encoding="utf-8") as f:
            head = f.read(1 << 16)
        return "coco" if '"annotations"' in head else "karpathy"
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    if first.strip().lower().replace(" ", "") == "image,caption":
        return "csv"
    if "\t" in first:
        return "flickr8k"
    raise CaptionFormatError(
        f"{path}: cannot tell the caption format (first line {first[:60]!r}); "
        "set data.captions_format to one of flickr8k, csv, coco, karpathy"
    )


_READERS = {"flickr8k": _read_flickr8k, "csv": _read_csv, "coco": _read_coco, "karpathy": _read_karpathy}


def read_captions(path: str | Path, fmt: CaptionFormat = "auto", skip_malformed: bool = False) -> CaptionCorpus:
    """Read a caption file of format `fmt` (``auto`` detects it) into a `CaptionCorpus`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in _READERS:
        raise ValueError(f"unknown caption format {fmt!r}; choose one of auto, {', '.join(_READERS)}")
    out = _Collector(path, skip_malformed)
    _READERS[fmt](path, out)
    if not out.corpus.captions:
        raise CaptionFormatError(f"{path}: no captions found")
    if out.corpus.skipped:
        log.warning("%s: skipped %d malformed record(s)", path, out.corpus.skipped)
    return out.corpus


def read_split_file(path: str | Path) -> list[str]:
    """Image ids listed in an official split file (one image file name per line, e.g. Flickr_8k.devImages.txt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    ids = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            name = line.strip()
            if not name:
                continue
            if not _IMAGE_NAME.match(name):
                raise CaptionFormatError(f"{path}:{number}: {name!r} is not an image file name")
            ids.append(image_id(name))
    if not ids:
        raise CaptionFormatError(f"{path}: the split file lists no images")
    return ids


def deterministic_split(ids: Iterable[str], dev_fraction: float) -> tuple[list[str], list[str]]:
    """Split image ids into sorted (train, dev) lists by a hash of each id.

    An id is in dev when its SHA-1, read as a fraction of 1, is below `dev_fraction`: each image's split
    depends on its id alone, so it is the same on every machine and run, and adding images to a dataset
    never moves existing ones between splits. (If no id falls below, the lowest one goes to dev.)
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    position = {i: int(hashlib.sha1(i.encode("utf-8")).hexdigest()[:12], 16) / 16**12 for i in set(ids)}
    if not position:
        raise ValueError("no image ids to split")
    dev = {i for i, p in position.items() if p < dev_fraction} or {min(position, key=position.get)}
    return sorted(position.keys() - dev), sorted(dev)
