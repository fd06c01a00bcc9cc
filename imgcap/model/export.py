"""Exporting a bundle for shipping: a copy with its weights compressed (lossless float32, or float16 at about
half that size), and a check, caption by caption, that the copy captions a set of images as the original does.
The check is recorded in the copy's provenance, so a shipped bundle says what its weights were verified on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from imgcap.data.captions import read_split_file
from imgcap.data.feature_table import load_features
from imgcap.model.bundle import WeightsDtype, load_bundle, update_provenance


@dataclass(frozen=True)
class ExportCheck:
    """How many of the check images the exported bundle captions differently from the original."""

    features: str  # the features table the check captioned
    images: int
    changed: int
    changed_ids: tuple[str, ...] = ()  # every image whose caption changed
    examples: tuple[tuple[str, str, str], ...] = ()  # (image id, original caption, exported caption), up to 5

    def format(self) -> str:
        lines = [f"check: {self.changed} of {self.images} captions changed (features {self.features})"]
        lines += [f"  {image_id}: {before!r} -> {after!r}" for image_id, before, after in self.examples]
        return "\n".join(lines)


def export_bundle(bundle_path: str, directory: str | Path, weights_dtype: WeightsDtype = "float32",
                  check_features: str | None = None, check_split: str | None = None) -> ExportCheck | None:
    """Copy the bundle at `bundle_path` to `directory`, its weights compressed as `weights_dtype`. With
    `check_features` (a features table of the bundle's backbone; `check_split` limits it to a split file's
    images), caption those images with the original and the copy, and record how many captions changed in the
    copy's provenance (``export.check``)."""
    original = load_bundle(bundle_path)
    table = load_features(check_features) if check_features else None  # a bad check fails before anything is written
    if table is not None and check_split:
        table = table.select(sorted(set(read_split_file(check_split)) & set(table.ids)))
    export = {"from": str(bundle_path), "fingerprint": original.fingerprint, "weights_dtype": weights_dtype}
    original.provenance = {**original.provenance, "export": export}
    original.save(directory, weights_dtype)
    if table is None:
        return None
    before, after = original.caption(table.features), load_bundle(directory).caption(table.features)
    changed = [(i, " ".join(b), " ".join(a)) for i, b, a in zip(table.ids, before, after) if b != a]
    check = ExportCheck(str(check_features), len(table.ids), len(changed), tuple(i for i, _, _ in changed),
                        tuple(changed[:5]))
    update_provenance(directory, export={**export, "check": asdict(check)})
    return check
