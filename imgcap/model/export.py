"""Exporting a bundle for shipping: a copy with its weights compressed (lossless float32, or float16 at about
half that size), optionally with other decoding settings, and a check, caption by caption, that the copy
captions a set of images as the original does with the same decoding. The check is recorded in the copy's
provenance, so a shipped bundle says what its weights were verified on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imgcap.config.loader import config_from_dict, config_to_dict
from imgcap.config.model import DecodeConfig
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
                  check_features: str | None = None, check_split: str | None = None,
                  decode: dict[str, Any] | None = None) -> ExportCheck | None:
    """Copy the bundle at `bundle_path` to `directory`, its weights compressed as `weights_dtype` and `decode`
    (keys of `DecodeConfig`, e.g. {"no_repeat_ngram_size": 2}) replacing those of its recorded decoding. With
    `check_features` (a features table of the bundle's backbone; `check_split` limits it to a split file's
    images), caption those images with the original and the copy, both decoding as the copy does, and record
    how many captions changed in the copy's provenance (``export.check``)."""
    original = load_bundle(bundle_path)
    # Validated before anything is written, as is the check's table: a typo in a key fails the export.
    original.decode = config_from_dict(DecodeConfig, {**config_to_dict(original.decode), **(decode or {})})
    table = load_features(check_features) if check_features else None
    if table is not None and check_split:
        table = table.select(sorted(set(read_split_file(check_split)) & set(table.ids)))
    export = {"from": str(bundle_path), "fingerprint": original.fingerprint, "weights_dtype": weights_dtype,
              **({"decode": decode} if decode else {})}
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
