"""Captioner speed against the seed notebooks' captioner, side by side in one run on the same features.

    .venv/bin/python benchmarks/bench_captioner.py [--json runs/bench_captioner.json]   # ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_captioner.py --quick                              # smoke run, ~2 min

On the shared Flickr8k MobileNetV2 features (../shared/flickr8k), in this order:

  seed       ../shared/baselines/seed_merge.py as a subprocess, `--epochs 1 --max-train-steps N
             --max-test-images M`: its generator takes one image (all its captions, one sample per prefix)
             per step, so its seconds per step are seconds per training image; greedy decoding is one
             model.predict per word.
  train (a)  imgcap at the seed's size (merge, 256 units, 256-d embedding, dropout 0.5, batch 64, the seed's
             text normalisation and vocabulary: every train word): one full epoch over the train images,
             every caption, timed after a few warm-up steps that take the one-off tf.function trace.
  train (a') model (a) trained with a sampled softmax (`train.sampled_softmax`, 1024 negative words per step):
             the same model and decoding, a cheaper training loss for large vocabularies.
  train (b)  the same with the [text]/[model]/[train] tables of configs/train_flickr8k.toml (skipped with a
             note when that file is absent or does not load).
  decoding   greedy, beam-3 and beam-5 captions for the dev images with model (a) after its epoch, timed
             after a warm-up batch that takes the graph trace.

Ratios: every training row against the seed's training images/s, every decoding row against the seed's
greedy decoding images/s. Both sides run one after the other on the same machine, so the ratios hold up under
load from other jobs better than absolute numbers do (the load average is printed before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared"
DEFAULT_TUNED_CONFIG = REPO / "configs" / "train_flickr8k.toml"
FEATURES_FILE = "features_mobilenet_v2.npz"
CAPTIONS_FILE = "Flickr8k.token.txt"
TRAIN_SPLIT_FILE = "Flickr_8k.trainImages.txt"
DEV_SPLIT_FILE = "Flickr_8k.devImages.txt"
SEED_SCRIPT = Path("baselines") / "seed_merge.py"
TRAIN_TARGET = 20.0  # x the seed's training images/s
GREEDY_TARGET = 100.0  # x the seed's greedy decoding images/s
BEAM3_TARGET = 30.0  # x the seed's greedy decoding images/s
QUICK = {"seed_steps": 20, "seed_images": 5, "train_images": 600, "dev_images": 200}


@dataclass(frozen=True)
class SharedPaths:
    """The shared Flickr8k files the benchmark reads."""

    root: Path
    features: Path
    captions: Path
    train_split: Path
    dev_split: Path
    seed_script: Path


@dataclass(frozen=True)
class SeedResult:
    """What one seed_merge.py run reported, as rates."""

    train_images_per_s: float
    greedy_images_per_s: float
    train_steps: int
    test_images: int
    vocab: int
    bleu4: float
    wall_s: float


@dataclass
class Row:
    """One line of the result table."""

    name: str
    images_per_s: float | None
    baseline: str  # "train" or "decode": which seed figure the ratio is against ("" for the seed rows)
    target: float | None = None
    detail: str = ""
    ratio: float | None = None

    @property
    def passed(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target


@dataclass
class Report:
    """Everything the run measured, printed as a table and optionally written as JSON."""

    command: str
    machine: dict[str, object]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def locate_shared(root: Path) -> SharedPaths:
    """The shared data files under `root`; exits with a message naming what is missing."""
    flickr = root / "flickr8k"
    paths = SharedPaths(root, flickr / FEATURES_FILE, flickr / CAPTIONS_FILE, flickr / TRAIN_SPLIT_FILE,
                        flickr / DEV_SPLIT_FILE, root / SEED_SCRIPT)
    missing = [str(p) for p in (paths.features, paths.captions, paths.train_split, paths.dev_split,
                                paths.seed_script) if not p.is_file()]
    if missing:
        sys.exit(f"bench_captioner: shared data not found: {', '.join(missing)}\n"
                 f"  expected the shared/ directory beside the repository ({DEFAULT_SHARED}); "
                 "pass --shared PATH to point elsewhere")
    return paths


def load_average() -> str:
    """The 1/5/15-minute load average, for judging how busy the machine was."""
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict[str, object]:
    """Cores, library versions and the load at the start of the run."""
    import keras
    import tensorflow as tf

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpus": os.cpu_count(), "usable_cpus": usable, "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "gpus": len(tf.config.list_physical_devices("GPU")), "load_average_start": load_average()}


def run_seed(paths: SharedPaths, steps: int, images: int, min_count: int) -> SeedResult:
    """Run the seed captioner for `steps` training images and `images` greedy captions; its rates."""
    command = [sys.executable, str(paths.seed_script), "--features", str(paths.features),
               "--captions", str(paths.captions), "--train", str(paths.train_split), "--test", str(paths.dev_split),
               "--epochs", "1", "--max-train-steps", str(steps), "--max-test-images", str(images),
               "--min-count", str(min_count)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.exit(f"bench_captioner: the seed captioner failed (exit {done.returncode}):\n"
                 f"  {shlex.join(command)}\n{done.stderr[-2000:]}")
    out = json.loads(lines[-1])
    return SeedResult(1.0 / out["train_s_per_image"], 1.0 / out["decode_s_per_image"],
                      out["train_steps_per_epoch"], out["test_images"], out["vocab"], out["bleu"][3], wall)


def seed_text_config(min_count: int):
    """The seed notebooks' text handling: their normalisation, train words seen at least `min_count` times."""
    from imgcap.config.model import TextConfig

    return TextConfig(mode="seed", min_count=min_count)


def seed_sized_configs():
    """(ModelConfig, TrainConfig) of the seed's size: merge, 256 units/embedding, dropout 0.5, batch 64."""
    from imgcap.config.model import ModelConfig
    from imgcap.config.training import TrainConfig

    return (ModelConfig(architecture="merge", embedding_dim=256, units=256, dropout=0.5),
            TrainConfig(epochs=1, batch_size=64))


def load_tuned_configs(path: Path):
    """(TextConfig, ModelConfig, TrainConfig) of the project's tuned training config; raises if it won't load."""
    from imgcap.config.loader import load_config
    from imgcap.config.training import TrainJobConfig

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    job = load_config(TrainJobConfig, path)
    return job.text, job.model, job.train


def load_data(paths: SharedPaths, text, max_train: int, max_dev: int):
    """imgcap's TrainingData for the shared features, captions and official splits."""
    from imgcap.config.training import DataConfig
    from imgcap.data.dataset import prepare_training_data

    data = DataConfig(captions=str(paths.captions), features=str(paths.features),
                      train_split=str(paths.train_split), dev_split=str(paths.dev_split),
                      max_train_images=max_train, max_dev_images=max_dev)
    return prepare_training_data(data, text)


def time_training_epoch(data, model_config, train_config, warmup_steps: int):
    """Train one full epoch; returns (trainer, epoch seconds, training loss, full-softmax dev loss).

    The warm-up steps take the trace first; the dev loss (untimed) shows what the epoch learned, comparable
    between the full and the sampled softmax.
    """
    import numpy as np

    from imgcap.model.decoder import build_model
    from imgcap.train.batches import CaptionBatches
    from imgcap.train.evaluation import DevEvaluator
    from imgcap.train.trainer import CaptionTrainer

    model = build_model(model_config, data.vocab, data.features.dim, train_config.seed, data.regions)
    trainer = CaptionTrainer(model, train_config)
    rng = np.random.default_rng(train_config.seed)
    features = data.features.features
    warmup = CaptionBatches(data.train, features, train_config.batch_size, lambda _: rng, num_batches=warmup_steps)
    trainer.train_epoch(*warmup.epoch(0))
    started = time.perf_counter()
    loss = trainer.train_epoch(*CaptionBatches(data.train, features, train_config.batch_size, lambda _: rng).epoch(0))
    seconds = time.perf_counter() - started
    evaluator = DevEvaluator(model, data.vocab, data.dev, features, features[:1], [[["a"]]])
    return trainer, seconds, loss, evaluator.loss()


def training_row(name: str, data, model_config, train_config, warmup_steps: int):
    """A training row (images/s over one epoch) and the trained model."""
    trainer, seconds, loss, dev_loss = time_training_epoch(data, model_config, train_config, warmup_steps)
    images = len(data.train_ids)
    m = model_config
    detail = (f"{m.architecture}, units {m.units}, emb {m.embedding_dim}, dropout {m.dropout}, "
              f"batch {train_config.batch_size}, vocab {len(data.vocab)}; {images} images / "
              f"{len(data.train)} captions in {seconds:.1f} s, train loss {loss:.2f}, dev loss {dev_loss:.2f}")
    if train_config.sampled_softmax:
        detail += f", sampled softmax {train_config.sampled_softmax}"
    return Row(name, images / seconds, "train", TRAIN_TARGET, detail), trainer.model


def time_decoding(decoder, features, warmup_images: int) -> tuple[float, list[list[int]]]:
    """Seconds to caption `features` (after a warm-up call on a few images that takes the trace) and the ids."""
    decoder.decode(features[:warmup_images])
    started = time.perf_counter()
    decoded = decoder.decode(features)
    return time.perf_counter() - started, decoded.tokens


def decoding_rows(model, data, batch_size: int, max_length: int, warmup_images: int) -> tuple[list[Row], list[str]]:
    """Greedy, beam-3 and beam-5 rows on the dev images, and notes with each one's BLEU-4 (a sanity check)."""
    from imgcap.metrics.evaluate import nltk_corpus_bleu
    from imgcap.model.beam import BeamSearchDecoder, GreedyDecoder

    features = data.features.select(data.dev_ids).features
    references = [data.dev_references[i] for i in data.dev_ids]
    decoders = [("imgcap greedy", GreedyDecoder(model, max_length, batch_size), GREEDY_TARGET),
                ("imgcap beam-3", BeamSearchDecoder(model, 3, max_length, batch_size), BEAM3_TARGET),
                ("imgcap beam-5", BeamSearchDecoder(model, 5, max_length, batch_size), None)]
    rows, notes = [], []
    for name, decoder, target in decoders:
        seconds, tokens = time_decoding(decoder, features, warmup_images)
        bleu4 = nltk_corpus_bleu(references, [data.vocab.decode(t) for t in tokens])[3]
        rows.append(Row(name, len(features) / seconds, "decode", target,
                        f"{len(features)} dev images in {seconds:.2f} s, batch {batch_size}, model (a)"))
        notes.append(f"{name}: dev BLEU-4 {bleu4:.4f} after one epoch (sanity check, not a quality claim)")
    return rows, notes


def fill_ratios(rows: list[Row], seed: SeedResult) -> None:
    """Set every row's ratio against the seed's training or greedy-decoding images/s."""
    base = {"train": seed.train_images_per_s, "decode": seed.greedy_images_per_s}
    for row in rows:
        if row.baseline and row.images_per_s is not None:
            row.ratio = row.images_per_s / base[row.baseline]


def format_table(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    lines = ["| run | images/s | vs seed | target | pass | details |", "|---|---:|---:|---:|:---:|---|"]
    for r in rows:
        rate = "skipped" if r.images_per_s is None else f"{r.images_per_s:,.1f}"
        ratio = "" if r.ratio is None else f"{r.ratio:,.1f}x"
        target = "" if r.target is None else f">= {r.target:g}x"
        verdict = {None: "", True: "PASS", False: "FAIL"}[r.passed]
        lines.append(f"| {r.name} | {rate} | {ratio} | {target} | {verdict} | {r.detail} |")
    return "\n".join(lines)


def format_report(report: Report) -> str:
    """Machine, command, table and notes, as printed at the end of the run."""
    m = report.machine
    head = [f"machine: {m['cpus']} CPUs ({m['usable_cpus']} usable), {m['processor']}, {m['gpus']} GPU(s); "
            f"Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}",
            f"load average (1/5/15 min): {m['load_average_start']} at start, {m.get('load_average_end', 'n/a')} at end",
            f"command: {report.command}", ""]
    notes = [""] + [f"- {n}" for n in report.notes] if report.notes else []
    return "\n".join(head + [format_table(report.rows)] + notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                        help="the shared/ directory (default: %(default)s)")
    parser.add_argument("--config", type=Path, default=DEFAULT_TUNED_CONFIG,
                        help="tuned training config for row (b) (default: %(default)s)")
    parser.add_argument("--seed-steps", type=int, default=300, help="seed training steps = images (default: 300)")
    parser.add_argument("--seed-images", type=int, default=20, help="seed greedy-decoded images (default: 20)")
    parser.add_argument("--train-images", type=int, default=0, help="imgcap train images (default 0: all 6000)")
    parser.add_argument("--dev-images", type=int, default=0, help="imgcap decoded dev images (default 0: all 1000)")
    parser.add_argument("--min-count", type=int, default=1,
                        help="vocabulary min word count for the seed and row (a) alike (default 1: the seed's default)")
    parser.add_argument("--sampled-softmax", type=int, default=1024,
                        help="negative words per step for row (a'); 0 skips the row (default: 1024)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="imgcap training steps before the timed epoch")
    parser.add_argument("--decode-batch", type=int, default=256, help="images per decoding batch (default: 256)")
    parser.add_argument("--max-length", type=int, default=30, help="decoding max caption length (default: 30)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['seed_steps']} seed steps, {QUICK['seed_images']} seed images, "
                             f"{QUICK['train_images']} train / {QUICK['dev_images']} dev images")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.quick:
        args.seed_steps, args.seed_images = QUICK["seed_steps"], QUICK["seed_images"]
        args.train_images, args.dev_images = QUICK["train_images"], QUICK["dev_images"]
    return args


def progress(message: str) -> None:
    """A timestamped progress line on stderr (the report goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = locate_shared(args.shared.resolve())
    started = time.perf_counter()
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join([".venv/bin/python", "benchmarks/bench_captioner.py", *given])
    report = Report(command, machine_info())
    text = seed_text_config(args.min_count)

    progress(f"seed: {args.seed_steps} training steps, {args.seed_images} greedy captions")
    seed = run_seed(paths, args.seed_steps, args.seed_images, text.min_count)
    report.rows.append(Row("seed train", seed.train_images_per_s, "", None,
                           f"seed_merge.py, {seed.train_steps} images (1 per step, incl. first trace), "
                           f"vocab {seed.vocab}"))

    progress("imgcap train (a): seed-sized model, one epoch")
    data = load_data(paths, text, args.train_images, args.dev_images)
    model_a, train_a = seed_sized_configs()
    row_a, model = training_row("imgcap train (a) seed size", data, model_a, train_a, args.warmup_steps)
    report.rows.append(row_a)
    if args.sampled_softmax >= len(data.vocab):
        report.rows.append(Row("imgcap train (a') sampled softmax", None, "train", TRAIN_TARGET,
                               f"skipped: --sampled-softmax {args.sampled_softmax} >= vocabulary {len(data.vocab)}"))
    elif args.sampled_softmax:
        progress(f"imgcap train (a'): seed-sized model, sampled softmax {args.sampled_softmax}, one epoch")
        sampled = replace(train_a, sampled_softmax=args.sampled_softmax)
        row, _ = training_row("imgcap train (a') sampled softmax", data, model_a, sampled, args.warmup_steps)
        report.rows.append(row)

    try:
        tuned_text, tuned_model, tuned_train = load_tuned_configs(args.config)
    except Exception as exc:  # absent or invalid: the row is skipped, the run goes on
        report.rows.append(Row("imgcap train (b) tuned", None, "train", TRAIN_TARGET, f"skipped: {exc}"))
    else:
        progress(f"imgcap train (b): {args.config.name}, one epoch")
        tuned_data = data if tuned_text == text else load_data(paths, tuned_text, args.train_images, args.dev_images)
        row_b, _ = training_row(f"imgcap train (b) {args.config.name}", tuned_data, tuned_model, tuned_train,
                                args.warmup_steps)
        row_b.detail += f", text {tuned_text.mode}/min_count {tuned_text.min_count}"
        report.rows.append(row_b)

    report.rows.append(Row("seed greedy decode", seed.greedy_images_per_s, "", None,
                           f"seed_merge.py, {seed.test_images} dev images, one model.predict per word"))
    progress("imgcap decoding: greedy, beam-3, beam-5")
    rows, notes = decoding_rows(model, data, args.decode_batch, args.max_length, warmup_images=8)
    report.rows.extend(rows)
    fill_ratios(report.rows, seed)

    report.notes.append(f"seed: BLEU-4 {seed.bleu4:.4f} on its {seed.test_images} images after "
                        f"{seed.train_steps} steps; subprocess wall time {seed.wall_s:.0f} s")
    report.notes.extend(notes)
    report.machine["load_average_end"] = load_average()
    report.notes.append(f"benchmark wall time {time.perf_counter() - started:.0f} s")
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": report.command, "machine": report.machine, "notes": report.notes,
                   "seed": asdict(seed),
                   "rows": [{**asdict(r), "passed": r.passed} for r in report.rows]}
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    failed = [r.name for r in report.rows if r.passed is False]
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
