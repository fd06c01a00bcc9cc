"""What the caption job writes besides its Parquet rows: the caption schema, BLEU reports, thumbnails for the
contact sheet.

The captioning job's outputs, in its ``output_dir``:

- ``captions/``: one row per input image (CAPTION_SCHEMA): the image id and source URI it came from, the
  caption (null with an `error` when the image could not be read or embedded), its log-probability, the
  decoding and the bundle that made it, and a small JPEG thumbnail (images input only);
- with references: ``report.parquet`` (each image's references and sentence BLEU-4), ``scores.parquet`` /
  ``scores.json`` (corpus scores with the split, text mode, decoding and scorer that qualify them);
- ``report.html``: a static contact sheet (thumbnails, captions, references and BLEU when given).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgcap.io.outputs import OutputDirectory
from imgcap.metrics.evaluate import EvaluationReport, nltk_sentence_bleu

CAPTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float32()),  # total log-probability of the caption under the model
        ("error", pa.string()),  # why there is no caption (e.g. the image could not be read)
        ("decoding", pa.string()),
        ("bundle", pa.string()),
        ("thumbnail", pa.binary()),  # a small JPEG for the contact sheet (null for features input)
    ]
)


def write_report(per_image: pa.Table, report: EvaluationReport, output: OutputDirectory) -> None:
    """Write the per-image BLEU report (`reference_rows`) and the corpus scores into `output`'s directory."""
    report_path = f"{output.path}/report.parquet"
    pq.write_table(per_image, report_path, filesystem=output.filesystem)
    rows = [{"scorer": "nltk", "metric": f"bleu{n + 1}", "value": v} for n, v in enumerate(report.nltk_bleu)]
    rows += [{"scorer": "coco", "metric": k, "value": v} for k, v in report.coco.items()]
    context = {"split": report.split, "text_mode": report.text_mode, "decoding": report.decoding,
               "num_images": report.num_images}
    pq.write_table(pa.Table.from_pylist([{**r, **context} for r in rows]), f"{output.path}/scores.parquet",
                   filesystem=output.filesystem)
    output.write_file("scores.json", json.dumps(report.as_dict(), indent=2).encode("utf-8"))


def reference_rows(captions: pa.Table, references: dict[str, list[list[str]]]) -> pa.Table:
    """The captioned images that have references: image_id, source, caption, references, sentence BLEU-4."""
    scored = captions.filter(pc.invert(pc.is_null(captions["caption"])))
    scored = scored.filter(pc.is_in(scored["image_id"], pa.array(list(references), pa.string())))
    ids = scored["image_id"].to_pylist()
    hyps = [c.split() for c in scored["caption"].to_pylist()]
    return pa.table({
        "image_id": pa.array(ids, pa.string()),
        "source": scored["source"],
        "caption": scored["caption"],
        "references": pa.array([[" ".join(r) for r in references[i]] for i in ids], pa.list_(pa.string())),
        "bleu4": pa.array([nltk_sentence_bleu(references[i], h) for i, h in zip(ids, hyps)], pa.float32()),
    })


def thumbnails_of(captions_dir: OutputDirectory, image_ids: Iterable[str]) -> dict[str, bytes]:
    """The thumbnails of `image_ids` only (the column is the bulk of a captions file, so it is read filtered)."""
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    found: dict[str, bytes] = {}
    for path in captions_dir.files():
        table = captions_dir.read_table(path, columns=["image_id", "thumbnail"])
        table = table.filter(pc.and_(pc.is_in(table["image_id"], value_set=wanted), pc.is_valid(table["thumbnail"])))
        found.update(zip(table["image_id"].to_pylist(), table["thumbnail"].to_pylist()))
    return found
