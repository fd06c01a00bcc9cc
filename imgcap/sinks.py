"""Outputs of the captioning job: caption rows and BLEU reports, as Parquet (plus a JSON summary).

``captions/`` holds one row per input image (CAPTION_SCHEMA): the image id and source URI it came from, the
caption (null with an `error` when the image had no feature), its log-probability, the decoding and the
bundle that made it. Where references exist, ``report.parquet`` adds each image's references and
sentence BLEU-4, and ``scores.parquet`` / ``scores.json`` hold the corpus scores with the split, text mode,
decoding and scorer that qualify them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgcap.evaluate import EvaluationReport, nltk_sentence_bleu

CAPTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float32()),  # total log-probability of the caption under the model
        ("error", pa.string()),  # why there is no caption (e.g. the image could not be decoded)
        ("decoding", pa.string()),
        ("bundle", pa.string()),
    ]
)


def read_captions_output(directory: str | Path) -> pa.Table:
    """All caption rows written to `directory` by the captioning job."""
    return pq.read_table(Path(directory), schema=CAPTION_SCHEMA)


def write_report(captions: pa.Table, references: dict[str, list[list[str]]], report: EvaluationReport,
                 output_dir: str | Path) -> None:
    """Write the per-image BLEU report and the corpus scores next to the captions."""
    output_dir = Path(output_dir)
    scored = captions.filter(pc.invert(pc.is_null(captions["caption"])))
    scored = scored.filter(pc.is_in(scored["image_id"], pa.array(list(references), pa.string())))
    ids = scored["image_id"].to_pylist()
    hyps = [c.split() for c in scored["caption"].to_pylist()]
    per_image = pa.table({
        "image_id": ids,
        "source": scored["source"],
        "caption": scored["caption"],
        "references": [[" ".join(r) for r in references[i]] for i in ids],
        "bleu4": pa.array([nltk_sentence_bleu(references[i], h) for i, h in zip(ids, hyps)], pa.float32()),
    })
    pq.write_table(per_image, output_dir / "report.parquet")
    rows = [{"scorer": "nltk", "metric": f"bleu{n + 1}", "value": v} for n, v in enumerate(report.nltk_bleu)]
    rows += [{"scorer": "coco", "metric": k, "value": v} for k, v in report.coco.items()]
    context = {"split": report.split, "text_mode": report.text_mode, "decoding": report.decoding,
               "num_images": report.num_images}
    pq.write_table(pa.Table.from_pylist([{**r, **context} for r in rows]), output_dir / "scores.parquet")
    (output_dir / "scores.json").write_text(json.dumps(report.as_dict(), indent=2), encoding="utf-8")
