"""Feature extraction speed and memory, side by side in one run on the same images.

    .venv/bin/python benchmarks/bench_extract.py            # ~8 min on 2 cores

Speed (MobileNetV2, the shared weights, the 300 shared Flickr8k images repeated `--repeat` times):
  (a) the seeds' loop: keras.utils.load_img(target_size=(224, 224)) + img_to_array + preprocess_input +
      model.predict, one image at a time;
  (b) the raw batched CNN forward on arrays decoded beforehand (the machine's limit: no I/O, no decode);
  Ray pipeline: imgcap.batch.extract.extract_features on a local Ray cluster (read + decode tasks, one CNN actor,
      Parquet out). End to end includes starting the actor and loading the model; steady state is the
      marginal rate between a run of N and a run of 2N images, which cancels that fixed cost.
Memory: peak PSS of the driver plus every Ray process (sampled every 0.25 s) while extracting 1k vs 20k
synthetic JPEGs with the `thumbnail` backbone (so the 20k run takes about a minute, not ten).

Images are symlinked / generated in a temporary directory; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from imgcap.testing.fixtures import synthetic_jpegs  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
IMAGES = SHARED / "flickr8k" / "Images"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


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


def seed_loop(model, paths: list[Path]) -> float:
    """Images/s of the seeds' one-image-at-a-time loop."""
    import keras

    start = time.perf_counter()
    for path in paths:
        image = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(224, 224)))
        batch = keras.applications.mobilenet_v2.preprocess_input(np.expand_dims(image, 0))
        model.predict(batch, verbose=0)
    return len(paths) / (time.perf_counter() - start)


def raw_forward(model, pixels: np.ndarray, batch_size: int) -> float:
    """Images/s of preprocess + forward on already-decoded arrays, `batch_size` at a time."""
    from imgcap.vision.backbones import BACKBONES

    spec = BACKBONES["mobilenet_v2"]
    model.predict_on_batch(spec.preprocess(pixels[:batch_size]))  # trace once, outside the timing
    start = time.perf_counter()
    for first in range(0, len(pixels), batch_size):
        model.predict_on_batch(spec.preprocess(pixels[first:first + batch_size]))
    return len(pixels) / (time.perf_counter() - start)


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


def run_pipeline(images: Path, output: Path, backbone: str, batch_size: int):
    from imgcap.batch.extract import extract_features
    from imgcap.config.jobs import ExtractConfig
    from imgcap.config.loader import config_from_dict

    table = {"sources": [{"path": str(images)}], "output_dir": str(output), "backbone": backbone,
             "batch_size": batch_size, "rows_per_file": 10000}
    if backbone == "mobilenet_v2":
        table["weights_file"] = str(WEIGHTS)
    summary = extract_features(config_from_dict(ExtractConfig, table))
    assert summary.failed == 0 and summary.missing == 0, summary.format()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=4, help="copies of the 300 shared images (N = 300 x repeat)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--memory-counts", type=int, nargs="*", default=[1000, 20000])
    args = parser.parse_args()
    if not IMAGES.is_dir() or not WEIGHTS.is_file():
        sys.exit(f"shared data not found under {SHARED}")

    import ray

    from imgcap.vision.backbones import build_backbone
    from imgcap.vision.imaging import ImagingOptions, load_pixels

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        root = Path(tmp)
        paths = repeated_images(root / "n", args.repeat)
        repeated_images(root / "2n", 2 * args.repeat)
        n = len(paths)
        print(f"{n} images ({len(paths) // args.repeat} shared x {args.repeat}), {os.cpu_count()} cores, "
              f"MobileNetV2 batch {args.batch_size}", flush=True)

        # The machine may be shared: measure (b) before, between and after the pipeline runs and use the mean,
        # so a load change hits both sides alike.
        model = build_backbone("mobilenet_v2", str(WEIGHTS))
        pixels = np.stack([load_pixels(p.read_bytes(), ImagingOptions((224, 224))) for p in paths])
        load = [os.getloadavg()[0]]
        raws = [raw_forward(model, pixels, args.batch_size)]
        once = run_pipeline(root / "n", root / "out_n", "mobilenet_v2", args.batch_size)
        raws.append(raw_forward(model, pixels, args.batch_size))
        twice = run_pipeline(root / "2n", root / "out_2n", "mobilenet_v2", args.batch_size)
        raws.append(raw_forward(model, pixels, args.batch_size))
        del pixels
        seeds = seed_loop(model, paths)
        load.append(os.getloadavg()[0])
        raw = float(np.mean(raws))
        steady = n / (twice.seconds - once.seconds)
        print(f"pipeline runs:\n{once.format()}\n{twice.format()}")
        print(f"(b) measured 3 times: {', '.join(f'{r:.1f}' for r in raws)} img/s; "
              f"1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end", flush=True)

        rows = [
            ("(a) seeds' loop: load_img + predict per image", seeds),
            ("(b) raw batched forward, pre-decoded arrays (mean of 3)", raw),
            (f"Ray pipeline, end to end ({n} images, incl. actor start)", once.images_per_second),
            (f"Ray pipeline, end to end ({2 * n} images)", twice.images_per_second),
            ("Ray pipeline, steady state (2N run - N run)", steady),
        ]
        print(f"\n| {'MobileNetV2, ' + str(n) + ' images, batch ' + str(args.batch_size):<58} | img/s | vs (b) | vs (a) |")
        print(f"|{'-' * 60}|------:|-------:|-------:|")
        for label, rate in rows:
            print(f"| {label:<58} | {rate:5.1f} | {rate / raw:6.0%} | {rate / seeds:5.1f}x |", flush=True)

        memory_rows = []
        for count in args.memory_counts:
            synthetic_images(root / f"syn{count}", count)
            with PeakMemory() as peak:
                summary = run_pipeline(root / f"syn{count}", root / f"out_syn{count}", "thumbnail", 64)
            memory_rows.append((count, peak.peak, summary.images_per_second))
        if memory_rows:
            print("\n| synthetic 320x240 JPEGs, thumbnail backbone | peak PSS driver + Ray | img/s |")
            print("|---------------------------------------------:|----------------------:|------:|")
            for count, peak_bytes, rate in memory_rows:
                print(f"| {count:>44} | {peak_bytes / 2**30:17.2f} GiB | {rate:5.0f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
