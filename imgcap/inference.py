"""Batch captioning on Ray Data: feature rows -> caption actors -> Parquet, then BLEU where references exist.

Each actor of the pool loads the model bundle once and captions whole batches with one compiled decoding
graph. Rows whose image had no feature (an extraction error) pass through with their error and no caption,
so every input row has an output row. With references, the driver scores the written captions (corpus
BLEU-1..4 and CIDEr, per-image BLEU-4) and writes the reports (see `imgcap.sinks`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgcap.bundle import load_bundle
from imgcap.captions import read_captions, read_split_file
from imgcap.config import CaptionJobConfig, DecodeConfig
from imgcap.evaluate import EvaluationReport, coco_available, evaluate_captions
from imgcap.features import FEATURE_SCHEMA, feature_matrix, feature_rows, load_features
from imgcap.sinks import CAPTION_SCHEMA, read_captions_output, write_report
from imgcap.text import normalize

log = logging.getLogger(__name__)


class BundleCaptioner:
    """Ray Data actor: loads a bundle once, then captions batches of FEATURE_SCHEMA rows."""

    def __init__(self, bundle_dir: str, decode: DecodeConfig | None = None) -> None:
        self.bundle = load_bundle(bundle_dir)
        self.decode = decode or self.bundle.decode
        self.bundle_dir = str(bundle_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        has_feature = pc.and_(pc.is_null(batch["error"]), pc.invert(pc.is_null(batch["feature"])))
        ok = has_feature.to_numpy(zero_copy_only=False)
        captions: list[str | None] = [None] * batch.num_rows
        scores = np.full(batch.num_rows, np.nan, dtype=np.float32)
        if ok.any():
            features = feature_matrix(batch.filter(has_feature)["feature"], self.bundle.model.feature_dim)
            decoded = self.bundle.decoder(self.decode).decode(features)
            rows = np.flatnonzero(ok)
            scores[rows] = decoded.scores
            for row, ids in zip(rows, decoded.tokens):
                captions[row] = " ".join(self.bundle.vocab.decode(ids))
        errors = batch["error"].to_pylist()
        return pa.Table.from_arrays([
            batch["image_id"], batch["source"], pa.array(captions, pa.string()),
            pa.array(scores, pa.float32(), mask=np.isnan(scores)),
            pa.array([e if e else (None if k else "no feature") for e, k in zip(errors, ok)], pa.string()),
            pa.array([self.decode.label] * batch.num_rows, pa.string()),
            pa.array([self.bundle_dir] * batch.num_rows, pa.string()),
        ], schema=CAPTION_SCHEMA)


@dataclass(frozen=True)
class CaptionJobResult:
    """What a captioning run wrote, and its scores when references were given."""

    output_dir: Path
    images: int
    captioned: int
    failed: int
    seconds: float
    report: EvaluationReport | None

    def format(self) -> str:
        lines = [f"captions -> {self.output_dir / 'captions'}",
                 f"  images {self.images}, captioned {self.captioned}, without caption {self.failed}, "
                 f"{self.seconds:.1f} s ({self.images / max(self.seconds, 1e-9):.1f} img/s)"]
        if self.report is not None:
            lines.append("  " + self.report.summary())
        return "\n".join(lines)


def _feature_dataset(path: str):
    """The features at `path` as a Ray Dataset of FEATURE_SCHEMA rows (.npz is read on the driver)."""
    import ray.data

    if path.endswith(".npz"):
        table = load_features(path)  # an .npz does not say which backbone made it: the column stays empty
        return ray.data.from_arrow(feature_rows(table.ids, table.sources, "", table.features, [""] * len(table.ids)))
    return ray.data.read_parquet(path, columns=FEATURE_SCHEMA.names)


def _check_backbone(features: str, backbone: str) -> None:
    """Refuse features made by another CNN than the one the bundle was trained on."""
    if not backbone or features.endswith(".npz"):
        return
    found = set(pc.unique(pq.read_table(features, columns=["backbone"])["backbone"]).to_pylist()) - {None}
    if found and found != {backbone}:
        raise ValueError(f"{features} holds features of {sorted(found)} but the bundle was trained on "
                         f"{backbone!r} features: extract with backbone = {backbone!r}")


def run_caption_job(config: CaptionJobConfig) -> CaptionJobResult:
    """Caption every feature row with a pool of `config.actors` bundle actors; score against references."""
    bundle = load_bundle(config.bundle)  # fail fast on a bad bundle, before any actor starts
    decode = config.decode or bundle.decode
    _check_backbone(config.features, bundle.backbone)
    output = Path(config.output_dir)
    captions_dir = output / "captions"
    if captions_dir.exists() and any(captions_dir.iterdir()):
        raise FileExistsError(f"{captions_dir} already holds captions: choose another output_dir or delete it")
    references = None
    if config.references:
        corpus = read_captions(config.references, config.references_format)
        references = {i: [t for t in (normalize(c, bundle.text.mode) for c in caps) if t]
                      for i, caps in corpus.captions.items()}
    import ray.data

    started = time.perf_counter()
    dataset = _feature_dataset(config.features)
    if config.split:
        wanted = pa.array(sorted(set(read_split_file(config.split))), pa.string())
        dataset = dataset.map_batches(lambda t: t.filter(pc.is_in(t["image_id"], value_set=wanted)),
                                      batch_format="pyarrow")
    captioned = dataset.map_batches(
        BundleCaptioner, fn_constructor_kwargs={"bundle_dir": str(Path(config.bundle).resolve()), "decode": decode},
        batch_size=config.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=config.actors))
    captioned.write_parquet(str(captions_dir))
    seconds = time.perf_counter() - started
    table = read_captions_output(captions_dir)
    failed = table["caption"].null_count
    report = None
    if references is not None:
        scored = table.filter(pc.invert(pc.is_null(table["caption"])))
        hypotheses = {i: c.split() for i, c in zip(scored["image_id"].to_pylist(), scored["caption"].to_pylist())
                      if i in references}
        if hypotheses:
            split = Path(config.split).stem if config.split else "all"
            report = evaluate_captions(references, hypotheses, split=split, text_mode=bundle.text.mode,
                                       decoding=decode.label, coco=config.coco and coco_available())
            write_report(table, references, report, output)
        else:
            log.warning("no captioned image has references in %s: no scores written", config.references)
    return CaptionJobResult(output, table.num_rows, table.num_rows - failed, failed, seconds, report)


@dataclass(frozen=True)
class PhotoCaption:
    """The caption of one photo file, or why it has none."""

    path: str
    caption: str | None
    error: str | None = None


def caption_photos(bundle_dir: str | Path, photos: list[str], weights: str | None = "imagenet",
                   decode: DecodeConfig | None = None, resize: str = "stretch",
                   resample: str = "nearest") -> list[PhotoCaption]:
    """Caption a few photo files directly: decode, embed with the bundle's backbone, decode captions.

    For bulk work use the Ray jobs; this is for trying a bundle on single images. `weights` are the
    backbone's ("imagenet", a weights file, or None); `resize`/`resample` must match how the training
    features were extracted (the extraction defaults are the seeds' stretch + nearest).
    """
    from imgcap.backbones import build_backbone, get_backbone
    from imgcap.decode import DecodeError, DecodeOptions, decode_image

    bundle = load_bundle(bundle_dir)
    if not bundle.backbone:
        raise ValueError(f"{bundle_dir} does not record the backbone its features came from "
                         "(data.backbone was not set when it was trained)")
    name, _, pooling = bundle.backbone.partition("/")
    spec = get_backbone(name)
    options = DecodeOptions(spec.input_size, resize, resample)  # type: ignore[arg-type]
    results: list[PhotoCaption | None] = []
    pixels = []
    for photo in photos:
        try:
            pixels.append(decode_image(Path(photo).read_bytes(), options))
            results.append(None)
        except (OSError, DecodeError) as exc:
            results.append(PhotoCaption(photo, None, str(exc)))
    if pixels:
        cnn = build_backbone(name, weights, pooling or "default")  # type: ignore[arg-type]
        features = np.asarray(cnn.predict_on_batch(spec.preprocess(np.stack(pixels))), np.float32)
        captions = iter(bundle.caption(features.reshape(len(pixels), -1), decode))
        results = [r if r is not None else PhotoCaption(photo, " ".join(next(captions)))
                   for r, photo in zip(results, photos)]
    return results  # type: ignore[return-value]
