"""The captioning job: images (or a features table) -> captions in Parquet, BLEU reports and an HTML contact
sheet, on Ray Data (jobs/caption.py, ``imgcap caption-job``). The product's bulk captioning job.

From images it is one streaming pipeline, so memory stays flat in the number of images:

    list sources (driver) -> read + pixels (CPU tasks) -> captioner actors (CNN + caption decoding) -> Parquet

The CNN is extraction's (`imgcap.batch.extract.FeatureExtractor`) with the backbone, pooling and imaging options
recorded in the bundle, so a bundle captions new photos exactly as its training features were made. The same
actor then decodes the captions (`ImageCaptioner`) rather than a second pool of caption actors: every actor
of a pool holds its CPUs (and GPU) for the whole job, so two pools plus the read tasks need at least three
CPUs and stall on a 2-CPU machine (seen here: "3/2 CPU" requested, nothing running); a feature never leaves
the actor that made it; and caption decoding is about 6% of an image's time next to the CNN, so it gains
little from scaling apart (benchmarks/bench_caption_images.py: one actor 94% of the raw CNN rate in steady
state, two half-CPU pools 81%, within the run-to-run noise end to end). On a GPU node the decoder runs
on the actor's GPU too. A features table is captioned by a pool of caption actors alone (`BundleCaptioner`).

One row per input image, always: images that cannot be read or embedded keep their error and get no caption.
Rerunning into the same ``output_dir`` resumes exactly as extraction does (`imgcap.io.outputs.OutputDirectory`):
images already captioned are skipped, half-written files are set aside, nothing is duplicated, and captions
of another bundle or decoding are refused rather than mixed. With references, the driver scores every
caption written so far (corpus BLEU-1..4 and CIDEr, per-image BLEU-4) and writes the reports.

The bundle module (TensorFlow) and Ray Data are imported inside functions on purpose: a Ray worker unpickling
an actor class and a driver checking a config load neither before `import_tensorflow`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgcap.batch.actors import actor_pool_args, check_gpus_schedulable
from imgcap.batch.caption_outputs import (
    CAPTION_SCHEMA,
    reference_rows,
    thumbnails_of,
    write_report,
)
from imgcap.batch.extract import FeatureExtractor
from imgcap.batch.html_report import render_contact_sheet, select_rows
from imgcap.batch.reading import pixels_dataset
from imgcap.config.jobs import CaptionJobConfig
from imgcap.config.loader import ConfigError
from imgcap.config.model import DecodeConfig
from imgcap.data.captions import read_captions, read_split_file
from imgcap.data.feature_table import (
    FEATURE_SCHEMA,
    feature_matrix,
    feature_rows,
    load_features,
)
from imgcap.data.text import normalize
from imgcap.io.outputs import INCOMPLETE_DIR, OutputDirectory
from imgcap.io.sources import list_images
from imgcap.io.storage import S3Options, filesystem_for
from imgcap.metrics.evaluate import EvaluationReport, coco_available, evaluate_captions
from imgcap.pretrained import model_label
from imgcap.runtime.cluster import init_ray
from imgcap.runtime.fault_injection import fault_point
from imgcap.runtime.logs import import_tensorflow
from imgcap.runtime.recovery import Recovery, RecoveryWatch
from imgcap.vision.embedder import resolve_weights

if TYPE_CHECKING:
    from imgcap.model.bundle import CaptionBundle

log = logging.getLogger(__name__)

CAPTIONS_DIR = "captions"
HTML_REPORT = "report.html"
EXAMPLES = 5  # captions the job's summary shows


class BundleCaptioner:
    """Ray Data actor: loads a bundle once, then captions batches of feature rows with one compiled decoding
    graph per batch. The bundle module (and TensorFlow) is imported here, not at module level, so a Ray worker
    unpickling this class does not pay TensorFlow's import before `quiet_tensorflow`."""

    def __init__(self, bundle_path: str, decode: DecodeConfig, s3: S3Options) -> None:
        import_tensorflow()  # before the bundle module imports it: no CPU banners
        from imgcap.model.bundle import load_bundle

        self.bundle = load_bundle(bundle_path, s3)
        self.decode = decode

    def __call__(self, batch: pa.Table) -> pa.Table:
        fault_point("caption")
        has_feature = pc.and_(pc.is_null(batch["error"]), pc.is_valid(batch["feature"]))
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
        count = batch.num_rows
        thumbnails = batch["thumbnail"] if "thumbnail" in batch.column_names else pa.nulls(count, pa.binary())
        return pa.Table.from_arrays([
            batch["image_id"], batch["source"], pa.array(captions, pa.string()),
            pa.array(scores, pa.float32(), mask=np.isnan(scores)),
            pa.array([e if e else (None if k else "no feature") for e, k in zip(errors, ok)], pa.string()),
            pa.array([self.decode.label] * count, pa.string()),
            pa.array([self.bundle.fingerprint] * count, pa.string()),
            thumbnails,
        ], schema=CAPTION_SCHEMA)


class ImageCaptioner:
    """Ray Data actor of the images path: the bundle's CNN and its decoder in one process, loaded once;
    `pixels_batch` rows -> caption rows."""
    def __init__(self, bundle_path: str, decode: DecodeConfig, s3: S3Options, weights: str | None) -> None:
        self.captioner = BundleCaptioner(bundle_path, decode, s3)
        self.embedder = FeatureExtractor(self.captioner.bundle.embedding, weights, on_ray=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self.captioner(self.embedder(batch))


@dataclass(frozen=True)
class CaptionJobResult:
    """What a captioning run did, where it wrote, and its scores when references were given."""
    output_dir: str
    listed: int  # input images (after the split filter)
    skipped: int  # already captioned by an earlier run into the same output
    captioned: int  # rows of this run with a caption
    failed: int  # rows of this run without one (their error says why)
    seconds: float
    incomplete_files: int
    report: EvaluationReport | None
    outputs: dict[str, str]  # what was written: captions, report, scores, html
    failures: tuple[tuple[str, str], ...] = ()
    recovery: Recovery | None = None  # what Ray retried (None: not known, or nothing ran)
    model: str = ""  # the bundle captioned with, and its fingerprint
    examples: tuple[tuple[str, str], ...] = ()  # a few (image id, caption) of the output, to see at a glance

    @property
    def missing(self) -> int:
        """Listed images with no row (always 0 unless the pipeline lost rows)."""
        return self.listed - self.skipped - self.captioned - self.failed

    def format(self) -> str:
        done = self.captioned + self.failed
        lines = [f"captioning -> {self.output_dir}", f"  model {self.model}",
                 f"  images {self.listed}, already captioned (skipped) {self.skipped}, captioned {self.captioned}, "
                 f"without caption {self.failed}",
                 f"  {self.seconds:.1f} s ({done / max(self.seconds, 1e-9):.1f} img/s)"]
        if self.incomplete_files:
            lines.append(f"  {self.incomplete_files} incomplete file(s) of an interrupted run moved to "
                         f"{INCOMPLETE_DIR}/ (their images were captioned again)")
        lines += [f"  failed: {image_id}: {error}" for image_id, error in self.failures]
        if self.recovery is not None and self.recovery.anything:
            lines.append(f"  {self.recovery.format()}")
        if self.missing:
            lines.append(f"  WARNING: {self.missing} listed image(s) have no row; rerun to caption them")
        if self.report is not None:
            lines.append("  " + self.report.summary())
        lines += [f"  {image_id}: {caption}" for image_id, caption in self.examples]
        lines += [f"  {name:9} {where}" for name, where in self.outputs.items()]
        return "\n".join(lines)


def _split_ids(config: CaptionJobConfig) -> pa.Array | None:
    return pa.array(sorted(set(read_split_file(config.split))), pa.string()) if config.split else None


def _features_dataset(config: CaptionJobConfig, bundle: "CaptionBundle", done: set[str], decode: DecodeConfig,
                      s3: S3Options) -> tuple[Any, int, int]:
    """Caption rows of a features table (minus the split's outsiders and the done) through the caption actor
    pool; how many images the table lists for this job and how many of those were done before."""
    import ray.data

    wanted = _split_ids(config)
    if config.features.endswith(".npz"):
        table = load_features(config.features)  # an .npz does not say which backbone made it
        rows = feature_rows(table.ids, table.sources, "", table.features, [""] * len(table.ids))
    else:
        filesystem, path = filesystem_for(config.features, s3)
        rows = pq.read_table(path, columns=FEATURE_SCHEMA.names, filesystem=filesystem)
        found = set(pc.unique(rows["backbone"]).to_pylist()) - {None}
        if bundle.backbone and found and found != {bundle.backbone}:
            raise ConfigError(f"features: {config.features} holds features of {sorted(found)} but the bundle was "
                              f"trained on {bundle.backbone!r} features: extract with backbone = {bundle.backbone!r}")
    if wanted is not None:
        rows = rows.filter(pc.is_in(rows["image_id"], value_set=wanted))
    listed = rows.num_rows
    if done:
        rows = rows.filter(pc.invert(pc.is_in(rows["image_id"], value_set=pa.array(sorted(done), pa.string()))))
    if not rows.num_rows:
        return None, listed, listed
    check_gpus_schedulable(config.pool)
    # Driver-side table of a few KB per image: fine for features tables (the bulk path is images, streamed).
    captions = ray.data.from_arrow(rows).map_batches(
        BundleCaptioner, fn_constructor_kwargs={"bundle_path": config.bundle, "decode": decode, "s3": s3},
        batch_size=config.batch_size, batch_format="pyarrow", **actor_pool_args(config.pool))
    return captions, listed, listed - rows.num_rows


def _images_dataset(config: CaptionJobConfig, bundle: "CaptionBundle", done: set[str], decode: DecodeConfig,
                    s3: S3Options) -> tuple[Any, int, int]:
    """Caption rows of the images of `config.sources` not yet captioned, streamed through the read/pixels tasks
    and the captioner actor pool; how many images are listed for this job, how many were done before."""
    if bundle.embedding is None:
        raise ConfigError(f"bundle: {config.bundle} does not record how its training features were made (no "
                          f"backbone): caption a features table instead (features), or retrain with data.backbone set")
    refs = list_images(config.sources, s3, config.extensions, config.id_from)
    wanted = _split_ids(config)
    if wanted is not None:
        keep = set(wanted.to_pylist())
        refs = [ref for ref in refs if ref.image_id in keep]
    todo = [ref for ref in refs if ref.image_id not in done]
    if not todo:
        return None, len(refs), len(refs)
    weights = resolve_weights(config.cnn.weights, config.cnn.weights_file)
    check_gpus_schedulable(config.cnn.pool, "cnn")
    pixels = pixels_dataset(todo, bundle.embedding.imaging(config.max_pixels), s3, config.shard_size,
                            config.thumbnail_size)
    captions = pixels.map_batches(ImageCaptioner, fn_constructor_kwargs={
        "bundle_path": config.bundle, "decode": decode, "s3": s3, "weights": weights},
        batch_size=config.cnn.batch_size, batch_format="numpy", **actor_pool_args(config.cnn.pool))
    return captions, len(refs), len(refs) - len(todo)


def _references(config: CaptionJobConfig, bundle: "CaptionBundle") -> dict[str, list[list[str]]] | None:
    if not config.references:
        return None
    corpus = read_captions(config.references, config.references_format)
    return {i: [t for t in (normalize(c, bundle.text.mode) for c in caps) if t] for i, caps in corpus.captions.items()}


def captions_directory(config: CaptionJobConfig, s3: S3Options) -> OutputDirectory:
    """Where the job writes its caption rows: ``<output_dir>/captions/`` (reports and the HTML page sit in
    ``output_dir`` itself)."""
    return OutputDirectory(f"{config.output_dir.rstrip('/')}/{CAPTIONS_DIR}", s3)


def run_caption_job(config: CaptionJobConfig) -> CaptionJobResult:
    """Caption every input image not yet in ``config.output_dir``; score against references; write the reports
    and the contact sheet (see the module docstring). Uses the running Ray cluster, or starts a local one."""
    import_tensorflow()
    from imgcap.model.bundle import load_bundle

    started = time.perf_counter()
    s3 = S3Options.from_config(config.s3)
    bundle = load_bundle(config.bundle, s3)  # fail fast on a bad bundle, before any actor starts
    decode = config.decode or bundle.decode
    references = _references(config, bundle)  # a bad caption file fails before any work
    captions_out = captions_directory(config, s3)
    done, incomplete = captions_out.scan({"bundle": bundle.fingerprint, "decoding": decode.label})

    init_ray()
    watch = RecoveryWatch()
    source = _images_dataset if config.sources else _features_dataset
    captions, listed, skipped = source(config, bundle, done, decode, s3)
    written = captions_out.write(captions, CAPTION_SCHEMA, config.rows_per_file) if captions is not None else None
    recovery = watch.report() if written is not None else None
    seconds = time.perf_counter() - started

    outputs = {"captions": captions_out.uri}
    table = captions_out.read(CAPTION_SCHEMA, columns=[n for n in CAPTION_SCHEMA.names if n != "thumbnail"])
    report = None
    scored = None
    if references is not None:
        scored = reference_rows(table, references)
        if scored.num_rows:
            split = config.split.rsplit("/", 1)[-1].rsplit(".", 1)[0] if config.split else "all"
            hypotheses = dict(zip(scored["image_id"].to_pylist(), (c.split() for c in scored["caption"].to_pylist())))
            report = evaluate_captions(references, hypotheses, split=split, text_mode=bundle.text.mode,
                                       decoding=decode.label, coco=config.coco and coco_available())
            write_report(scored, report, OutputDirectory(config.output_dir, s3))
            outputs.update(report=f"{config.output_dir.rstrip('/')}/report.parquet",
                           scores=f"{config.output_dir.rstrip('/')}/scores.parquet")
        else:
            log.warning("no captioned image has references in %s: no scores written", config.references)
    outputs["html"] = write_contact_sheet(config, captions_out, table, scored, report, s3)
    ok, failed, failures = (written.ok, written.failed, written.failures) if written else (0, 0, ())
    model = f"{model_label(config.bundle)}, {bundle.fingerprint}"
    captioned = table.filter(pc.is_valid(table["caption"])).sort_by("image_id").slice(0, EXAMPLES)
    examples = tuple(zip(captioned["image_id"].to_pylist(), captioned["caption"].to_pylist()))
    return CaptionJobResult(config.output_dir, listed, skipped, ok, failed, seconds, incomplete, report, outputs,
                            failures, recovery, model, examples)


def write_contact_sheet(config: CaptionJobConfig, captions_out: OutputDirectory, table: pa.Table,
                        scored: pa.Table | None, report: EvaluationReport | None, s3: S3Options) -> str:
    """Write ``report.html`` next to the captions: every row up to `html_max_rows` (the best and worst halves
    by BLEU-4 beyond that), thumbnails embedded; returns its URI."""
    rows = table.select(["image_id", "source", "caption", "error"])
    if scored is not None and scored.num_rows:
        # Acero's join cannot carry list columns (the references), so the report rows are matched by index.
        where = {image_id: row for row, image_id in enumerate(scored["image_id"].to_pylist())}
        matched = pa.array([where.get(i) for i in rows["image_id"].to_pylist()], pa.int64())
        rows = rows.append_column("references", scored["references"].take(matched))
        rows = rows.append_column("bleu4", scored["bleu4"].take(matched))
    shown = select_rows(rows, config.html_max_rows)
    thumbnails = thumbnails_of(captions_out, shown["image_id"].to_pylist())
    shown = shown.append_column("thumbnail", pa.array([thumbnails.get(i) for i in shown["image_id"].to_pylist()],
                                                      pa.binary()))
    title = f"imgcap captions: {config.output_dir}"
    html = render_contact_sheet(shown, report, title=title, max_rows=config.html_max_rows, total_rows=rows.num_rows)
    OutputDirectory(config.output_dir, s3).write_file(HTML_REPORT, html.encode("utf-8"))
    return f"{config.output_dir.rstrip('/')}/{HTML_REPORT}"


