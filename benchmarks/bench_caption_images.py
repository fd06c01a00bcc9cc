"""Bulk captioning (images -> captions) speed, where the time goes, and memory: side by side in one run.

    .venv/bin/python benchmarks/bench_caption_images.py                 # ~9 min on 2 quiet cores (longer under load)
    .venv/bin/python benchmarks/bench_caption_images.py --images 600 --memory-sizes 1000 --seed-images 10  # smoke
    .venv/bin/python benchmarks/bench_caption_images.py --json runs/bench_caption_images.json --skip-memory

Everything runs on the same images: the 300 shared Flickr8k images (../shared/flickr8k/Images) symlinked under
new names up to N (`--images`, default 2400), MobileNetV2 with the shared weights file, and one caption bundle
trained at the start of the run from the shared features (merge, 256 units, 256-d embedding, one epoch on
`--train-images` train images, data.backbone = "mobilenet_v2"; its recorded decoding is beam-3, and the job runs
with that). Ray is local: ``ray.init(num_cpus=2)`` once.

Speed rows (images/s; ratios against (b) and (a)):
  (a)   the seeds' loop on `--seed-images` images, extrapolated per image: keras.utils.load_img(target_size=
        (224, 224)) + img_to_array + mobilenet_v2.preprocess_input + model.predict per image, then greedy
        decoding with one model.predict per word, on the SAME trained bundle's Keras model (CaptionModel.call
        takes (features [B, D], tokens [B, T]) -> logits [B, T, V]: the token window is right-padded to
        max_length, so the LSTM is causal and the logits at step t are those of the prefix alone).
  (b)   the raw batched CNN forward on pixels decoded beforehand (CnnEmbedder.embed: preprocess +
        predict_on_batch, batch 32) over N/2 images: the machine's limit for the CNN. Measured before, between
        and after the groups of pipeline runs (5 passes with --repeats 2, 3 with --repeats 1) and averaged.
  (J)   imgcap.batch.caption.run_caption_job from the image directory at N/2 and N images, each into a fresh
        output dir (includes actor start and model loads); the steady state (N - N/2) / (t_N - t_N/2)
        cancels those fixed costs. With --repeats 2 (default) every size runs twice in ABBA order (N/2, N, N,
        N/2) and the times are averaged, so a load that drifts during the run (a shared machine) biases
        neither size. An untimed 64-image run first warms the Ray workers.
  two pools: the same pipeline wired in this file from the library's pieces (pixels_dataset, CnnEmbedder,
        BundleCaptioner, OutputDirectory) with the layout the job does not use, at N/2 and N: the job runs one
        pool of actors holding the CNN and the decoder (`ImageCaptioner`); this runs two pools (CNN actor ->
        caption actor, `--two-pool-cpus` CPUs each: two 1-CPU actors plus a 1-CPU read task do not fit in
        2 CPUs and the job never starts).

Time breakdown (each stage measured alone, ms/image of wall time and of CPU time): pixels (load_pixels on the
300 images' bytes), the job's 96-px thumbnail on top (pixels_batch with thumbnails minus load_pixels), CNN
(b), caption decoding (bundle.decoder(...).decode on N/2 features: beam-3 at the job's batch, plus beam-3 at
the other batch and greedy for reference), Parquet write of the caption rows; next to the end-to-end
ms/image of (J).

Memory: peak PSS of the driver plus every Ray process (sampled every 0.25 s) while the job captions a .tar of
`--memory-sizes` synthetic 320x240 JPEGs with a small untrained `thumbnail`-backbone bundle (cnn.weights =
"none"): flat in the number of images when the pipeline streams.

Ray Data's `Dataset.stats()` of every run is summarised per operator for the N-image runs (busy time, CPU
use), kept whole in the JSON file (`--json`) and printed to stderr with `--stats`. Images, bundles and
outputs live in a temporary directory; nothing is written to the repository.

The machine may be shared: the load average is printed, and a table splits the core-seconds of every
measurement between this benchmark's processes (driver, model actor, caption actor, Ray task workers, Ray's
own processes), other tenants and idle; a warning names the measurements where other processes took more than
10% of the cores. The steady state is a difference of two run times, so it moves most under load.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from imgcap.testing.fixtures import synthetic_jpegs, untrained_bundle  # noqa: E402

SHARED = REPO.parent / "shared"
FLICKR = SHARED / "flickr8k"
IMAGES = FLICKR / "Images"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def progress(message: str) -> None:
    """A timestamped progress line on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ inputs


def repeated_images(directory: Path, count: int) -> list[Path]:
    """`count` images: the shared ones cycled under distinct names (symlinks), so each copy is its own image id."""
    directory.mkdir(parents=True, exist_ok=True)
    sources = sorted(IMAGES.glob("*.jpg"))
    paths = []
    for k in range(count):
        source = sources[k % len(sources)]
        link = directory / f"r{k // len(sources)}_{source.name}"
        link.symlink_to(source)
        paths.append(link)
    return paths


def synthetic_archive(path: Path, count: int, distinct: int = 200) -> int:
    """An uncompressed .tar of `count` 320x240 JPEGs cycling through `distinct` synthetic pictures; its size."""
    encoded = synthetic_jpegs(distinct)
    with tarfile.open(path, "w") as archive:
        for i in range(count):
            data = encoded[i % distinct]
            info = tarfile.TarInfo(f"syn/{i // 1000:03d}/syn{i:06d}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------- bundles


def train_bundle(directory: Path, train_images: int) -> tuple[str, float]:
    """A merge decoder at the seed's size (256 units, 256-d embedding) trained one epoch on the shared
    MobileNetV2 features, decoding beam-3 recorded; its directory and the training seconds."""
    from imgcap.config.loader import config_from_dict
    from imgcap.config.training import TrainJobConfig
    from imgcap.train.local import train_captioner

    config = config_from_dict(TrainJobConfig, {
        "output_dir": str(directory),
        "data": {"captions": str(FLICKR / "Flickr8k.token.txt"), "features": str(FLICKR / "features_mobilenet_v2.npz"),
                 "train_split": str(FLICKR / "Flickr_8k.trainImages.txt"),
                 "dev_split": str(FLICKR / "Flickr_8k.devImages.txt"), "backbone": "mobilenet_v2",
                 "max_train_images": train_images, "max_dev_images": 100},
        "model": {"architecture": "merge", "embedding_dim": 256, "units": 256},
        "train": {"epochs": 1, "batch_size": 128, "select_by": "loss"},
        "decode": {"beam_width": 3}})
    started = time.perf_counter()
    bundle_path = train_captioner(config, progress=False).bundle_path
    return str(bundle_path), time.perf_counter() - started


# ---------------------------------------------------------------------------------------- in-process rows


class Timer:
    """Wall and CPU seconds (this process, all threads) of a block."""

    def __enter__(self) -> "Timer":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def seed_loop(cnn_model: Any, caption_model: Any, paths: list[Path], max_length: int) -> tuple[Timer, Timer, list]:
    """The seeds' loop, one image at a time: load_img + predict for the feature, then greedy decoding with one
    model.predict per word on the bundle's model; (feature timer, decoding timer, token ids per image)."""
    import keras

    from imgcap.data.text import END_ID, PAD_ID, START_ID, UNK_ID

    features = []
    with Timer() as feature_time:
        for path in paths:
            image = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(224, 224)))
            batch = keras.applications.mobilenet_v2.preprocess_input(np.expand_dims(image, 0))
            features.append(np.asarray(cnn_model.predict(batch, verbose=0), np.float32).reshape(1, -1))
    banned = np.zeros(caption_model.vocab_size, np.float32)
    banned[[PAD_ID, UNK_ID, START_ID]] = -1e9  # the words imgcap's decoders never emit, so captions compare
    captions = []
    with Timer() as decode_time:
        for feature in features:
            window = np.full((1, max_length), PAD_ID, np.int32)  # right-padded: the LSTM never sees the padding
            window[0, 0] = START_ID
            ids = []
            for t in range(max_length):
                logits = caption_model.predict((feature, window), verbose=0)
                word = int(np.argmax(logits[0, t] + banned))
                if word == END_ID:
                    break
                ids.append(word)
                if t + 1 < max_length:
                    window[0, t + 1] = word
            captions.append(ids)
    return feature_time, decode_time, captions


def raw_forward(embedder: Any, pixels: np.ndarray, batch_size: int) -> tuple[float, float, np.ndarray]:
    """(images/s, CPU s per image, features) of CnnEmbedder.embed on decoded arrays, `batch_size` at a time."""
    embedder.embed(pixels[:batch_size])  # trace once, outside the timing
    out = []
    with Timer() as timer:
        for first in range(0, len(pixels), batch_size):
            out.append(embedder.embed(pixels[first:first + batch_size]))
    return len(pixels) / timer.wall, timer.cpu / len(pixels), np.concatenate(out)


def stage_timings(paths: list[Path], features: np.ndarray, bundle: Any, thumbnail_size: int,
                  caption_batch: int, workdir: Path) -> dict[str, dict[str, float]]:
    """ms/image (wall and CPU) of every stage but the CNN, each measured alone in this process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgcap.batch.caption_outputs import CAPTION_SCHEMA
    from imgcap.config.model import DecodeConfig
    from imgcap.vision.imaging import load_pixels, pixels_batch

    options = bundle.embedding.imaging()
    data = [p.read_bytes() for p in paths]
    out: dict[str, dict[str, float]] = {}

    def record(name: str, timer: Timer, count: int) -> None:
        out[name] = {"ms_per_image": 1000 * timer.wall / count, "cpu_ms_per_image": 1000 * timer.cpu / count,
                     "images": count}

    load_pixels(data[0], options)
    with Timer() as timer:
        for blob in data:
            load_pixels(blob, options)
    record("pixels", timer, len(data))
    table = pa.table({"image_id": [p.stem for p in paths], "source": [str(p) for p in paths],
                      "data": pa.array(data, pa.binary()), "error": pa.array([None] * len(data), pa.string())})
    with Timer() as timer:
        batch = pixels_batch(table, options, thumbnail_size)
    record("pixels_batch_with_thumbnail", timer, len(data))

    for label, decode in (("decode_beam3", DecodeConfig(beam_width=3, batch_size=caption_batch)),
                          ("decode_beam3_batch32", DecodeConfig(beam_width=3, batch_size=32)),
                          ("decode_greedy", DecodeConfig(beam_width=1, batch_size=caption_batch))):
        decoder = bundle.decoder(decode)
        decoder.decode(features[:decode.batch_size])  # trace once
        with Timer() as timer:
            decoded = decoder.decode(features)
        record(label, timer, len(features))
        if label == "decode_beam3":
            captions = [" ".join(bundle.vocab.decode(ids)) for ids in decoded.tokens]
            scores = decoded.scores

    count = len(features)
    thumbs = [batch["thumbnail"][k % len(paths)] for k in range(count)]
    with Timer() as timer:
        rows = pa.Table.from_arrays([
            pa.array([f"img{k}" for k in range(count)], pa.string()),
            pa.array([f"/images/img{k}.jpg" for k in range(count)], pa.string()),
            pa.array(captions, pa.string()), pa.array(scores, pa.float32()),
            pa.nulls(count, pa.string()), pa.array(["beam-3"] * count, pa.string()),
            pa.array([bundle.fingerprint] * count, pa.string()), pa.array(thumbs, pa.binary())],
            schema=CAPTION_SCHEMA)
        pq.write_table(rows, workdir / "write_timing.parquet")
    record("write", timer, count)
    return out


# ---------------------------------------------------------------------------------------------- Ray runs


class PeakMemory:
    """Peak total PSS (shared pages split, not double counted) of this process and all its descendants, i.e.
    the driver plus the local Ray cluster it started, sampled in a thread (as benchmarks/bench_extract.py);
    `at_peak` is the per-process split at that moment (process title -> PSS bytes)."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.at_peak: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[str, int]:
        import psutil

        me = psutil.Process()
        split: dict[str, int] = {}
        for process in [me, *me.children(recursive=True)]:
            try:
                pss = process.memory_full_info().pss
                title = "driver" if process.pid == me.pid else " ".join(process.cmdline()[:1])[-60:]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            title = title.rsplit("/", 1)[-1] if title.startswith("/") else title
            split[title] = split.get(title, 0) + pss
        return split

    def _run(self) -> None:
        while not self._stop.is_set():
            split = self._sample()
            total = sum(split.values())
            if total > self.peak:
                self.peak, self.at_peak = total, split
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.baseline = sum(self._sample().values())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


CPU_GROUPS = ("model actor", "caption actor", "read + write tasks", "driver", "Ray system", "other tenants", "idle")


def _cpu_group(title: str) -> str:
    if title == "driver":
        return "driver"
    if any(name in title for name in ("ImageCaptioner", "CnnEmbedder", "FusedCaptioner")):
        return "model actor"
    if "BundleCaptioner" in title:
        return "caption actor"
    if title.startswith("ray::") and not any(name in title for name in (
            "Actor", "Agent", "Tracker", "Coordinator", "Watcher", "Manager", "Cleaner")):
        return "read + write tasks"  # pooled task workers: ray::IDLE, ray::MapBatches(...), ray::Write
    return "Ray system"  # gcs_server, raylet, dashboard, monitors, Ray Data's helper actors


class CpuAccount:
    """Where the machine's CPU time went during a block: per group of this process tree (the driver, the
    model actor, the caption actor, Ray's task workers, Ray's own processes), the rest of the machine's busy
    time (other tenants) and idle, in core-seconds. Sampled in a thread, so processes that exit during the
    block (the actors do, at the end of a run) still count up to their last sample."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self._stop = interval, threading.Event()
        self._first: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, first: bool = False) -> None:
        import psutil

        me = psutil.Process()
        for process in [me, *me.children(recursive=True)]:
            try:
                times = process.cpu_times()
                title = "driver" if process.pid == me.pid else " ".join(process.cmdline()[:1])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            used = times.user + times.system
            if first:
                self._first[process.pid] = used
            previous = self._last.get(process.pid)
            if previous is None or not title.startswith("ray::IDLE") or previous[0].startswith("ray::IDLE"):
                self._last[process.pid] = (title, used)
            else:
                self._last[process.pid] = (previous[0], used)  # keep the name of the work it did

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "CpuAccount":
        import psutil

        self._machine = psutil.cpu_times()
        self._wall = time.perf_counter()
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import psutil

        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.perf_counter() - self._wall
        end = psutil.cpu_times()
        idle = (end.idle + getattr(end, "iowait", 0.0)) - (self._machine.idle + getattr(self._machine, "iowait", 0.0))
        busy = (sum(end) - sum(self._machine)) - idle
        groups = dict.fromkeys(CPU_GROUPS, 0.0)
        for pid, (title, used) in self._last.items():
            groups[_cpu_group(title)] += used - self._first.get(pid, 0.0)
        groups["other tenants"] = max(0.0, busy - sum(groups.values()))
        groups["idle"] = idle
        self.wall, self.cores, self.groups = wall, (os.cpu_count() or 1), groups


def cpu_table(accounts: dict[str, Any]) -> str:
    """Core-seconds by group for each named CpuAccount, and each group's share of the cores x wall time."""
    lines = ["| run | wall s | " + " | ".join(CPU_GROUPS) + " |", "|-----|------:|" + "------:|" * len(CPU_GROUPS)]
    for name, account in accounts.items():
        available = account.wall * account.cores
        cells = [f"{account.groups[g]:.0f} ({account.groups[g] / available:.0%})" for g in CPU_GROUPS]
        lines.append(f"| {name} | {account.wall:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_captured: list[Any] = []


def capture_written_datasets() -> None:
    """Keep every Dataset the job writes (OutputDirectory.write, patched in this process only), so its Ray Data
    stats can be read after the run; the library files are untouched."""
    from imgcap.io.outputs import OutputDirectory

    original = OutputDirectory.write

    def write(self, dataset, schema, rows_per_file):  # type: ignore[no-untyped-def]
        _captured.append(dataset)
        return original(self, dataset, schema, rows_per_file)

    OutputDirectory.write = write  # type: ignore[method-assign]


def dataset_stats() -> str:
    """Ray Data stats of the last written dataset (then forgotten)."""
    if not _captured:
        return ""
    dataset = _captured.pop()
    _captured.clear()
    try:
        return dataset.stats()
    except Exception as exc:  # stats are a diagnostic: never fail the benchmark for them
        return f"(no stats: {type(exc).__name__}: {exc})"


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}


def operator_times(stats: str) -> list[dict[str, Any]]:
    """Per operator of a `Dataset.stats()` text: name, tasks, total remote wall and CPU seconds."""
    import re

    operators: list[dict[str, Any]] = []
    for line in stats.splitlines():
        head = re.match(r"Operator \d+ (.+?): (\d+) tasks executed", line)
        if head:
            operators.append({"operator": head.group(1), "tasks": int(head.group(2)), "wall_s": 0.0, "cpu_s": 0.0})
            continue
        total = re.match(r"\* Remote (wall|cpu) time: .*?, ([\d.]+)(us|ms|s|min) total", line.strip())
        if total and operators:
            operators[-1][f"{total.group(1)}_s"] = float(total.group(2)) * _UNITS[total.group(3)]
    return operators


def operators_table(runs: dict[str, tuple[str, float, int]]) -> str:
    """The operators of each named run (stats text, run seconds, images): busy time, CPU use, share of the run,
    and the images/s of the operator while its tasks ran (remote wall time)."""
    lines = ["| run | Ray Data operator | tasks | remote wall s | remote CPU s | CPU / wall | wall / run | "
             "img/s while busy |",
             "|-----|-------------------|------:|--------------:|-------------:|-----------:|-----------:|"
             "-----------------:|"]
    for run, (stats, seconds, images) in runs.items():
        for op in operator_times(stats):
            if op["operator"] in ("FromItems", "Input"):
                continue
            ratio = op["cpu_s"] / op["wall_s"] if op["wall_s"] else 0.0
            busy = f"{images / op['wall_s']:.1f}" if op["wall_s"] and op["operator"] != "Write" else ""
            lines.append(f"| {run} | {op['operator']} | {op['tasks']} | {op['wall_s']:.1f} | {op['cpu_s']:.1f} | "
                         f"{ratio:.2f} | {op['wall_s'] / seconds:.0%} | {busy} |")
    return "\n".join(lines)


def run_job(bundle_path: str, source: Path, output: Path, weights_file: str | None, cnn_batch: int,
            caption_batch: int, cpus: float = 1.0) -> tuple[Any, float]:
    """run_caption_job from `source` into a fresh `output`, `cpus` per actor (CNN and caption pools alike):
    (result, wall seconds including the report and contact sheet)."""
    from imgcap.batch.caption import run_caption_job
    from imgcap.config.jobs import CaptionJobConfig, CnnConfig, SourceConfig

    weights = {"weights_file": weights_file} if weights_file else {"weights": "none"}
    cnn = CnnConfig(batch_size=cnn_batch, cpus_per_actor=cpus, **weights)
    config = CaptionJobConfig(bundle=bundle_path, sources=[SourceConfig(str(source))], output_dir=str(output),
                              cnn=cnn, batch_size=caption_batch, cpus_per_actor=cpus)
    started = time.perf_counter()
    result = run_caption_job(config)
    wall = time.perf_counter() - started
    assert result.failed == 0 and result.missing == 0 and result.captioned == result.listed, result.format()
    return result, wall


def run_two_pools(bundle_path: str, source: Path, output: Path, weights_file: str, cnn_batch: int,
                  caption_batch: int, cpus: float, shard_size: int = 64, thumbnail_size: int = 96) -> tuple[int, float]:
    """The job's images path wired here with the layout it does not use, from the library's own pieces
    (listing, pixels_dataset, CnnEmbedder, BundleCaptioner, OutputDirectory): CnnEmbedder actors (batch
    `cnn_batch`) -> BundleCaptioner actors (batch `caption_batch`), `cpus` CPUs each.

    Returns (rows written, seconds as run_caption_job counts them: bundle load, listing, pipeline, write)."""
    import ray.data

    from imgcap.batch.caption import BundleCaptioner
    from imgcap.batch.caption_outputs import CAPTION_SCHEMA
    from imgcap.batch.extract import FeatureExtractor
    from imgcap.batch.reading import pixels_dataset
    from imgcap.config.jobs import CaptionJobConfig, SourceConfig
    from imgcap.io.outputs import OutputDirectory
    from imgcap.io.sources import list_images
    from imgcap.io.storage import S3Options
    from imgcap.model.bundle import load_bundle

    started = time.perf_counter()
    bundle = load_bundle(bundle_path)
    defaults = CaptionJobConfig(bundle=bundle_path, sources=[SourceConfig(str(source))])
    s3 = S3Options()
    refs = list_images(defaults.sources, s3, defaults.extensions, defaults.id_from)
    pixels = pixels_dataset(refs, bundle.embedding.imaging(defaults.max_pixels), s3, shard_size, thumbnail_size)
    one = ray.data.ActorPoolStrategy(size=1)
    features = pixels.map_batches(
        FeatureExtractor, fn_constructor_kwargs={"spec": bundle.embedding, "weights": weights_file, "on_ray": True},
        batch_size=cnn_batch, batch_format="numpy", compute=one, num_cpus=cpus)
    captions = features.map_batches(
        BundleCaptioner, fn_constructor_kwargs={"bundle_path": bundle_path, "decode": bundle.decode, "s3": s3},
        batch_size=caption_batch, batch_format="pyarrow", compute=one, num_cpus=cpus)
    written = OutputDirectory(str(output / "captions"), s3).write(captions, CAPTION_SCHEMA, defaults.rows_per_file)
    seconds = time.perf_counter() - started
    assert written.ok == len(refs) and written.failed == 0, written
    return written.ok, seconds


# --------------------------------------------------------------------------------------------- reporting


def speed_table(rows: list[tuple[str, float]], raw: float, seeds: float, title: str) -> str:
    width = max(len(title), *(len(label) for label, _ in rows))
    lines = [f"| {title:<{width}} | img/s | vs (b) | vs (a) |", f"|{'-' * (width + 2)}|------:|-------:|-------:|"]
    for label, rate in rows:
        lines.append(f"| {label:<{width}} | {rate:5.1f} | {rate / raw:6.0%} | {rate / seeds:5.1f}x |")
    return "\n".join(lines)


def breakdown_table(rows: list[tuple[str, float, float | None, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'stage (measured alone, in the driver)':<{width}} | ms/image | CPU ms/image | note |",
             f"|{'-' * (width + 2)}|---------:|-------------:|------|"]
    for label, ms, cpu, note in rows:
        cpu_text = "" if cpu is None else f"{cpu:.1f}"
        lines.append(f"| {label:<{width}} | {ms:8.1f} | {cpu_text:>12} | {note} |")
    return "\n".join(lines)


def memory_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| synthetic 320x240 JPEGs in one .tar, thumbnail backbone | peak PSS driver + Ray | "
             "PSS before | img/s | seconds |",
             "|------------------------------------------------------:|----------------------:|"
             "-----------:|------:|--------:|"]
    for r in rows:
        lines.append(f"| {r['images']:>54} | {r['peak_pss_bytes'] / 2**30:17.2f} GiB | "
                     f"{r['baseline_pss_bytes'] / 2**30:6.2f} GiB | {r['images_per_s']:5.0f} | {r['seconds']:7.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2400, help="N: the large run; the small run is N/2 "
                        "(default: %(default)s)")
    parser.add_argument("--seed-images", type=int, default=60, help="images of row (a) (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=2000, help="train images of the bundle's one epoch")
    parser.add_argument("--cnn-batch", type=int, default=32, help="CNN batch of (b) and the job (default: 32)")
    parser.add_argument("--caption-batch", type=int, default=256, help="decoding batch (default: 256)")
    parser.add_argument("--memory-sizes", default="1000,20000",
                        help="comma-separated archive sizes of the memory runs (default: %(default)s)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--skip-other-layout", action="store_true",
                        help="skip the runs of the other actor layout (fused vs two pools)")
    parser.add_argument("--two-pool-cpus", type=float, default=0.5,
                        help="CPUs per actor of a two-pool layout (default %(default)s: two 1-CPU pools and a "
                             "1-CPU read task do not fit in 2 CPUs)")
    parser.add_argument("--repeats", type=int, choices=(1, 2), default=2,
                        help="2 (default): run every size twice in ABBA order (N/2, N, N, N/2) and average, so a "
                             "load drift cancels; 1: once each")
    parser.add_argument("--stats", action="store_true", help="also print the Ray Data stats to stderr")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure as JSON here")
    args = parser.parse_args(argv)
    if args.images < 4 or args.images % 2:
        parser.error("--images must be an even number >= 4")
    args.memory_sizes = [] if args.skip_memory else [int(x) for x in args.memory_sizes.split(",") if x.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not IMAGES.is_dir() or not WEIGHTS.is_file():
        sys.exit(f"shared data not found under {SHARED}")
    began = time.perf_counter()
    loads = {"start": load_average()}
    n2, n1 = args.images, args.images // 2

    import ray

    from imgcap.config.model import DecodeConfig
    from imgcap.model.bundle import load_bundle
    from imgcap.vision.backbones import build_backbone
    from imgcap.vision.embedder import CnnEmbedder
    from imgcap.vision.imaging import load_pixels

    # run_caption_job runs one pool of actors holding the CNN and the decoder; the comparison is two pools.
    # Every actor holds its CPUs for the whole job and each read task asks for 1: on 2 CPUs two pools of 1-CPU
    # actors leave none for the reads and the job never starts, so the two pools get `--two-pool-cpus` each.
    layout, other = "fused", "two pools"
    job_cpus, other_cpus = 1.0, args.two_pool_cpus
    report: dict[str, Any] = {"command": " ".join([".venv/bin/python", "benchmarks/bench_caption_images.py",
                                                    *(sys.argv[1:] if argv is None else argv)]),
                              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "ray": ray.__version__},
                              "library_layout": layout, "other_layout": other}
    with tempfile.TemporaryDirectory(prefix="bench_caption_images_") as tmp:
        root = Path(tmp)
        progress(f"training the bundle ({args.train_images} train images, one epoch)")
        bundle_path, train_s = train_bundle(root / "train", args.train_images)
        bundle = load_bundle(bundle_path)
        assert bundle.decode.beam_width == 3 and bundle.embedding is not None
        progress(f"bundle trained in {train_s:.0f} s: vocab {len(bundle.vocab)}, decoding {bundle.decode.label}; "
                 f"run_caption_job layout: {layout} ({job_cpus:g} CPU per actor); compared with: {other}")

        small = repeated_images(root / f"n{n1}", n1)
        repeated_images(root / f"n{n2}", n2)
        repeated_images(root / "warm", 64)
        if not args.skip_other_layout:
            repeated_images(root / f"o{n1}", n1)
            repeated_images(root / f"o{n2}", n2)

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        capture_written_datasets()

        embedder = CnnEmbedder(bundle.embedding, str(WEIGHTS))
        options = bundle.embedding.imaging()
        shared = sorted(IMAGES.glob("*.jpg"))
        decoded = np.stack([load_pixels(p.read_bytes(), options) for p in shared])
        pixels = decoded[np.arange(n1) % len(decoded)]  # N/2 arrays decoded beforehand

        progress("warm-up job run (64 images, untimed)")
        run_job(bundle_path, root / "warm", root / "out_warm", str(WEIGHTS), args.cnn_batch, args.caption_batch,
                job_cpus)
        dataset_stats()

        # The machine may be shared: (b) is measured between the pipeline runs and averaged, so a load change
        # hits both sides alike; the job and the other layout alternate for the same reason.
        raws, cpus, stats, raw_cpu = [], [], {}, []
        runs: list[dict[str, Any]] = []

        def measure_raw(pixels: np.ndarray) -> np.ndarray:
            with CpuAccount() as account:
                rate, cpu, features = raw_forward(embedder, pixels, args.cnn_batch)
            raw_cpu.append(account)
            raws.append(rate)
            cpus.append(cpu)
            progress(f"(b) raw forward: {rate:.1f} img/s")
            return features

        def run_one(kind: str, count: int, rep: int) -> None:
            load = os.getloadavg()[0]
            out = root / f"out_{kind}{count}_{rep}"
            with CpuAccount() as account:
                if kind == "job":
                    progress(f"(J) run_caption_job, {count} images (pass {rep})")
                    result, wall = run_job(bundle_path, root / f"n{count}", out, str(WEIGHTS), args.cnn_batch,
                                           args.caption_batch, job_cpus)
                    done, seconds = result.captioned, result.seconds
                else:
                    progress(f"{other} (wired here), {count} images (pass {rep})")
                    done, seconds = run_two_pools(bundle_path, root / f"o{count}", out, str(WEIGHTS),
                                                  args.cnn_batch, args.caption_batch, other_cpus)
                    wall = seconds
            runs.append({"kind": kind, "images": done, "seconds": seconds, "wall_with_report": wall, "pass": rep,
                         "load1_before": round(load, 2), "stats": dataset_stats(), "cpu": account})
            progress(f"    {done} images in {seconds:.1f} s ({done / seconds:.1f} img/s), load {load:.1f}")

        # ABBA order (N/2, N, N, N/2 with the layouts alternating too) so a load that drifts during the run
        # biases neither size nor layout; (b) is measured between the groups.
        kinds = ["job"] if args.skip_other_layout else ["job", "other"]
        groups = [(n1, kinds), (n2, kinds)]
        if args.repeats == 2:
            groups += [(n2, kinds[::-1]), (n1, kinds[::-1])]
        features = measure_raw(pixels)
        for k, (count, order) in enumerate(groups):
            for kind in order:
                run_one(kind, count, 1 + k // 2)
            features = measure_raw(pixels)

        def mean_seconds(kind: str, count: int) -> float:
            return float(np.mean([r["seconds"] for r in runs if r["kind"] == kind and r["images"] == count]))

        raw = float(np.mean(raws))
        raw_cpu_ms = 1000 * float(np.mean(cpus))
        del pixels
        gc.collect()

        progress(f"(a) seeds' loop on {args.seed_images} images")
        seed_paths = small[:args.seed_images]
        seed_cnn = build_backbone("mobilenet_v2", str(WEIGHTS))
        feature_time, decode_time, seed_captions = seed_loop(seed_cnn, bundle.model, seed_paths,
                                                             bundle.decode.max_length)
        del seed_cnn
        seeds = len(seed_paths) / (feature_time.wall + decode_time.wall)
        seed_features = features[:len(seed_paths)]  # same images, same order (the repeated set starts at r0_)
        library_greedy = bundle.decoder(DecodeConfig(beam_width=1)).decode(seed_features).tokens
        same = sum(a == b for a, b in zip(seed_captions, library_greedy))

        progress("stage timings (pixels, thumbnails, decoding, write)")
        stages = stage_timings(shared, features, bundle, 96, args.caption_batch, root)
        loads["end"] = load_average()

        # ------------------------------------------------------------------------------------------- tables
        job1, job2 = mean_seconds("job", n1), mean_seconds("job", n2)
        steady = (n2 - n1) / (job2 - job1)
        job_label = "fused: 1 actor CNN + decoder"
        speed_rows = [
            (f"(a) seeds' loop: load_img + predict, greedy 1 predict/word ({len(seed_paths)} img)", seeds),
            (f"(b) raw batched CNN forward, pre-decoded ({n1} img, batch {args.cnn_batch}, mean of {len(raws)})",
             raw),
            (f"(J) run_caption_job [{job_label}], {n1} images", n1 / job1),
            (f"(J) run_caption_job [{job_label}], {n2} images", n2 / job2),
            (f"(J) steady state ({n2} - {n1}) / (t{n2} - t{n1})", steady),
        ]
        def busy_rate(kind: str) -> float:
            """Images/s of the run's busiest operator (the model actor) while its tasks ran, mean over the
            N-image runs: the pipeline's speed without actor start, model loads and waiting."""
            rates = []
            for r in runs:
                if r["kind"] == kind and r["images"] == n2:
                    ops = [o for o in operator_times(r["stats"]) if o["operator"] not in ("FromItems", "Write")]
                    if ops:
                        rates.append(n2 / max(o["wall_s"] for o in ops))
            return float(np.mean(rates)) if rates else float("nan")

        speed_rows.append((f"(J) model actor while busy (Ray Data remote wall, {n2}-image runs)", busy_rate("job")))
        other_steady = None
        if not args.skip_other_layout:
            other1, other2 = mean_seconds("other", n1), mean_seconds("other", n2)
            other_steady = (n2 - n1) / (other2 - other1)
            other_label = f"two pools (CNN actor -> caption actor, {other_cpus:g} CPU each)"
            speed_rows += [(f"{other_label}, {n2} images", n2 / other2),
                           (f"{other_label}, steady state", other_steady)]
        title = f"MobileNetV2 + merge-256 bundle, {bundle.decode.label}, {os.cpu_count()} cores"

        thumb_ms = stages["pixels_batch_with_thumbnail"]["ms_per_image"] - stages["pixels"]["ms_per_image"]
        thumb_cpu = (stages["pixels_batch_with_thumbnail"]["cpu_ms_per_image"]
                     - stages["pixels"]["cpu_ms_per_image"])
        job_decode = "decode_beam3_batch32"  # the fused actor decodes each CNN batch
        parts = [stages["pixels"]["ms_per_image"], thumb_ms, 1000 / raw, stages[job_decode]["ms_per_image"],
                 stages["write"]["ms_per_image"]]
        parts_cpu = [stages["pixels"]["cpu_ms_per_image"], thumb_cpu, raw_cpu_ms,
                     stages[job_decode]["cpu_ms_per_image"], stages["write"]["cpu_ms_per_image"]]
        total, total_cpu = sum(parts), sum(parts_cpu)
        job_batch = 32
        other_decode = "decode_beam3"
        cores = os.cpu_count() or 1
        breakdown = [
            (f"pixels: load_pixels (decode + resize), {len(shared)} images", parts[0], parts_cpu[0], "read task"),
            ("thumbnail 96 px JPEG (pixels_batch minus load_pixels)", parts[1], parts_cpu[1], "read task"),
            (f"CNN: (b) raw forward, batch {args.cnn_batch}", parts[2], parts_cpu[2], "CNN actor"),
            (f"caption decoding beam-3, batch {job_batch} (as the job), {n1} features", parts[3], parts_cpu[3],
             "fused actor"),
            (f"write: Parquet of {n1} caption rows (with thumbnails)", parts[4], parts_cpu[4], "write task"),
            ("sum of the stages", total, total_cpu,
             f"CPU sum / {cores} cores = {total_cpu / cores:.1f} ms: {1000 * cores / total_cpu:.1f} img/s "
             f"if perfectly packed"),
            (f"(decoding beam-3 at batch {32 if other_decode.endswith('32') else args.caption_batch}; "
             "not in the sum)", stages[other_decode]["ms_per_image"], stages[other_decode]["cpu_ms_per_image"], ""),
            (f"(decoding greedy at batch {args.caption_batch}; not in the sum)",
             stages["decode_greedy"]["ms_per_image"], stages["decode_greedy"]["cpu_ms_per_image"], ""),
            ("end to end: (J) steady state", 1000 / steady, None, f"{steady:.1f} img/s"),
            (f"end to end: (J) {n2} images", 1000 * job2 / n2, None, "incl. actor start + model loads"),
        ]
        if other_steady:
            breakdown.append((f"end to end: {other} steady state", 1000 / other_steady, None,
                              f"{other_steady:.1f} img/s"))

        memory_rows = []
        if args.memory_sizes:
            del features, decoded, embedder
            gc.collect()
            tiny = untrained_bundle(root / "tiny_bundle")
            for count in args.memory_sizes:
                archive = root / f"syn{count}.tar"
                size = synthetic_archive(archive, count)
                progress(f"memory: {count} synthetic JPEGs in {archive.name} ({size / 2**20:.0f} MiB)")
                with PeakMemory() as peak:
                    result, wall = run_job(tiny, archive, root / f"out_syn{count}", None, args.cnn_batch,
                                           args.caption_batch, job_cpus)
                top = sorted(peak.at_peak.items(), key=lambda kv: -kv[1])[:6]
                memory_rows.append({"images": count, "peak_pss_bytes": peak.peak, "baseline_pss_bytes": peak.baseline,
                                    "images_per_s": count / result.seconds, "seconds": result.seconds,
                                    "wall_with_report": wall, "archive_bytes": size, "at_peak": dict(top)})
                stats[f"memory{count}"] = dataset_stats()
                progress(f"    peak PSS {peak.peak / 2**30:.2f} GiB, {count / result.seconds:.0f} img/s")
                archive.unlink()
        loads["end_memory"] = load_average()
    ray.shutdown()
    wall_total = time.perf_counter() - began

    print(f"machine: {cores} cores, Ray {ray.__version__}; load average (1/5/15 min) "
          f"{loads['start']} at start, {loads['end']} after the speed runs, {loads['end_memory']} at end")
    print(f"bundle: merge, 256 units, 256-d embedding, 1 epoch on {args.train_images} train images ({train_s:.0f} s), "
          f"vocab {len(bundle.vocab)}; the job decodes with the bundle's {bundle.decode.label}")
    print(f"run_caption_job layout: {layout}; compared with: {other} (wired in the benchmark)")
    print(f"(b) passes: {', '.join(f'{r:.1f}' for r in raws)} img/s (mean {raw:.1f})")
    print("runs in order (seconds, 1-min load average before): " + ", ".join(
        f"{'J' if r['kind'] == 'job' else other} {r['images']}: {r['seconds']:.1f} s ({r['load1_before']:.1f})"
        for r in runs))
    print(f"(a) per image: feature {1000 * feature_time.wall / len(seed_paths):.0f} ms + greedy decoding "
          f"{1000 * decode_time.wall / len(seed_paths):.0f} ms (one predict per word on the bundle's CaptionModel); "
          f"{same}/{len(seed_paths)} captions identical to imgcap's GreedyDecoder on the (b) features")
    print()
    print(speed_table(speed_rows, raw, seeds, title))
    print(f"\nsteady state vs (b): {steady / raw:.0%} (goal >= 90%); vs (a): {steady / seeds:.1f}x")
    print()
    print(breakdown_table(breakdown))
    if memory_rows:
        print()
        print(memory_table(memory_rows))
    big = {f"{'(J)' if r['kind'] == 'job' else other} {n2} pass {r['pass']}": (r["stats"], r["seconds"], r["images"])
           for r in runs if r["images"] == n2}
    print()
    print(operators_table(big))
    accounts = {f"(b) pass {k + 1}": a for k, a in enumerate(raw_cpu)}
    accounts.update({f"{'(J)' if r['kind'] == 'job' else other} {r['images']} pass {r['pass']}": r["cpu"]
                     for r in runs})
    print("\ncore-seconds by process group during each measurement (share of cores x wall):\n")
    print(cpu_table(accounts))
    for r in memory_rows:
        print(f"memory {r['images']}: PSS at the peak by process: " + ", ".join(
            f"{name} {pss / 2**20:.0f} MiB" for name, pss in r["at_peak"].items()))
    disturbed = [name for name, account in accounts.items()
                 if account.groups["other tenants"] > 0.1 * account.wall * account.cores]
    if disturbed:
        print(f"\nWARNING: processes outside this benchmark used > 10% of the cores during: {', '.join(disturbed)}; "
              "the figures of those measurements are disturbed (rerun on a quiet machine to compare)")
    print(f"\nbenchmark wall time {wall_total:.0f} s")
    if args.stats:
        for r in runs:
            print(f"\n===== Ray Data stats: {r['kind']} {r['images']} pass {r['pass']} =====\n{r['stats']}",
                  file=sys.stderr)
        for name, text in stats.items():
            print(f"\n===== Ray Data stats: {name} =====\n{text}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report.update({
            "load_average": loads, "wall_seconds": wall_total, "images": [n1, n2],
            "bundle": {"train_images": args.train_images, "train_seconds": train_s, "vocab": len(bundle.vocab),
                       "decoding": bundle.decode.label},
            "speed": {label: rate for label, rate in speed_rows},
            "raw_passes": raws,
            "raw_cpu": [{"wall": a.wall, **a.groups} for a in raw_cpu],
            "runs": [{**{k: v for k, v in r.items() if k != "cpu"}, "cpu": {"wall": r["cpu"].wall, **r["cpu"].groups}}
                     for r in runs],
            "seed": {"images": len(seed_paths), "feature_seconds": feature_time.wall,
                     "decode_seconds": decode_time.wall, "captions_equal_to_greedy": same},
            "stages": stages, "breakdown": [{"stage": r[0], "ms_per_image": r[1], "cpu_ms_per_image": r[2],
                                            "note": r[3]} for r in breakdown],
            "memory": memory_rows, "ray_data_stats": stats})
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
