"""What the attention decoder costs per image against merge, side by side in one run on the same photos.

    .venv/bin/python benchmarks/bench_attention.py [--output runs/bench_attention.json]   # 7-9 min at load 20-30
    .venv/bin/python benchmarks/bench_attention.py --train-steps 8 --scst-steps 4 --decode-images 32 --rounds 2

The two decoders of the Flickr8k configs, each with its own [text] / [model] / [train] / [scst] / [decode]
tables: merge (configs/train_flickr8k.toml) on pooled EfficientNet-Lite2 features (runs/features_lite2,
1280-d) and attention (configs/train_flickr8k_attention.toml) on the 9x9x1280 grids of the same 7000 photos
(runs/features_lite2_grid, float16). Both build the same vocabulary from the same training captions. Both
models live in this one process and train without a strategy (`CaptionTrainer`: TensorFlow uses every core),
in three measurements that run in this order, each on both models:

  cross-entropy  `--train-steps` steps of the xe phase's batches (`imgcap.train.batches.phase_batches`: 64
                 length-bucketed reference captions a step, the same captions in the same order for both
                 models), after `--warmup-steps` untimed steps (the step function's trace). images/s is
                 counted as `imgcap train` counts it: captions/s x training images / training captions.
  decoding       beam search (`--beam-width`, the config's [decode] length penalty and batch of 256 images) of
                 the first `--decode-images` dev images, after one untimed pass over them (the graph's trace).
                 A search runs until the last beam of its batch has ended, so its cost follows the caption
                 lengths the model has learned so far (5 and 17 words on average after 120 and 200 steps, in
                 two runs): here `<end>` is suppressed so that every search takes exactly `--decode-length`
                 steps (default 16, the 90th percentile of the dev references' lengths; their mean is 10.9).
  self-critical  `--scst-steps` steps of the scst phase ([scst] of the config: 50 images a step, 5 captions
                 sampled per image, CIDEr-D rewards, the weighted step) continuing from the model above, after
                 `--warmup-steps` untimed steps; the sampling and rewards are inside the timing. The sampling
                 runs until the last of a step's 250 captions has ended (at most 20 words), so it too depends
                 a little on what the models have learned.

The machine may be shared, so every measurement runs in `--rounds` rounds that alternate the two models (the
order flips every round) and each takes 1/rounds of the steps; the ratio comes from the summed seconds, and
the per-round ratios show how much load changes moved it. The cost ratio is attention's seconds per image over
merge's (merge images/s / attention images/s): 2.0x means an image costs twice as much with attention.

Features: when a features directory is missing (a fresh machine), that model gets synthetic features of the
same shape and dtype for the same images instead (uniform random; speed does not depend on the values), and
the table says so. The real ones:
    python jobs/extract_features.py --config configs/extract_flickr8k_lite2.toml
    python jobs/extract_features.py --config configs/extract_flickr8k_lite2.toml --set pooling='"none"' \\
        --set feature_dtype='"float16"' --set output_dir='"../runs/features_lite2_grid"' --set rows_per_file=250
Needs the shared Flickr8k captions and splits (../shared/flickr8k). Starts no Ray. Prints a Markdown table;
`--output` also writes it with the raw per-round seconds as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from imgcap.config.loader import load_config  # noqa: E402
from imgcap.config.training import TrainJobConfig  # noqa: E402
from imgcap.vision.backbones import get_backbone  # noqa: E402
from imgcap.vision.spec import EmbeddingSpec  # noqa: E402

if TYPE_CHECKING:
    from imgcap.data.dataset import TrainingData
    from imgcap.model.decoder import Decoder
    from imgcap.train.batches import BatchSource

ARCHITECTURES = ("merge", "attention")
CONFIGS = {"merge": ROOT / "configs" / "train_flickr8k.toml",
           "attention": ROOT / "configs" / "train_flickr8k_attention.toml"}
FEATURES = {"merge": ROOT / "runs" / "features_lite2", "attention": ROOT / "runs" / "features_lite2_grid"}
# What extraction writes into those directories (configs/extract_flickr8k_lite2.toml and its grid variant).
SPECS = {"merge": EmbeddingSpec("efficientnet_lite2", "avg", "stretch", "bilinear"),
         "attention": EmbeddingSpec("efficientnet_lite2", "none", "stretch", "bilinear")}
DTYPES = {"merge": np.float32, "attention": np.float16}
# The shared MobileNetV2 table: only its image ids are used, to give synthetic features the same images.
SHARED_FEATURES = ROOT.parent / "shared" / "flickr8k" / "features_mobilenet_v2.npz"


@dataclass
class Contender:
    """One decoder with its job config, training data and where its features came from."""

    name: str
    job: TrainJobConfig
    data: TrainingData
    model: Decoder
    features: str  # the features directory, or "synthetic ..."


@dataclass
class Measurement:
    """One measurement of both models: seconds per round and the images each round processes."""

    name: str
    images_per_round: float
    seconds: dict[str, list[float]]
    note: str

    def images_per_second(self, name: str) -> float:
        return self.images_per_round * len(self.seconds[name]) / sum(self.seconds[name])

    @property
    def cost_ratio(self) -> float:
        """Attention's seconds per image over merge's."""
        return sum(self.seconds["attention"]) / sum(self.seconds["merge"])

    @property
    def round_ratios(self) -> list[float]:
        return [a / m for a, m in zip(self.seconds["attention"], self.seconds["merge"])]


def load_job(name: str) -> TrainJobConfig:
    """The config of `name` with its self-critical phase enabled (so `training_phases` lists both phases)."""
    return load_config(TrainJobConfig, CONFIGS[name], {"scst.enabled": True})


def synthetic_features(rows: int, dim: int, dtype: type, seed: int) -> np.ndarray:
    """[rows, dim] uniform random features in [0, 1) as `dtype`, made a block at a time (a float32 grid table
    would not fit next to the float16 one)."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), dtype)
    for start in range(0, rows, 256):
        block = out[start:start + 256]
        block[...] = rng.random(block.shape, dtype=np.float32)
    return out


def training_data(name: str, job: TrainJobConfig) -> tuple[TrainingData, str]:
    """The job's captions, vocabulary and examples with `FEATURES[name]`, or with synthetic features of the same
    shape (`SPECS[name]`, `DTYPES[name]`) for the same images when that directory is missing."""
    from imgcap.data.dataset import prepare_training_data
    from imgcap.data.feature_table import FeatureTable

    features = FEATURES[name]
    if features.exists():
        return prepare_training_data(dataclasses.replace(job.data, features=str(features)), job.text), str(features)
    spec = SPECS[name]
    data = prepare_training_data(dataclasses.replace(job.data, features=str(SHARED_FEATURES)), job.text)
    ids, dim = data.features.ids, get_backbone(spec.backbone).feature_dim(spec.pooling)  # type: ignore[arg-type]
    table = FeatureTable(ids, synthetic_features(len(ids), dim, DTYPES[name], job.train.seed), ids)
    label = f"synthetic {spec.tag} ({features} not found)"
    return dataclasses.replace(data, features=table, embedding=spec), label


def contender(name: str) -> Contender:
    """`name`'s job, data and a fresh model built as `imgcap train` builds it."""
    from imgcap.model.decoder import build_model

    job = load_job(name)
    data, features = training_data(name, job)
    model = build_model(job.model, data.vocab, data.features.dim, job.train.seed, data.regions)
    return Contender(name, job, data, model, features)


def endless(source: BatchSource) -> Iterator[Any]:
    """The batches of a phase's `BatchSource`, epoch after epoch."""
    for epoch in itertools.count():
        yield from source.epoch(epoch)[0]


def training_run(contender: Contender, phase_name: str) -> tuple[Callable[[int], float], int]:
    """(steps -> seconds of that many steps of the phase on the contender's model, the phase's batch size).

    Reuses the job's own pieces: `training_phases`, `phase_batches` and a `CaptionTrainer` (a fresh optimizer per
    phase, as `imgcap train`)."""
    from imgcap.train.batches import phase_batches
    from imgcap.train.state import training_phases
    from imgcap.train.trainer import CaptionTrainer

    phase = next(p for p in training_phases(contender.job) if p.name == phase_name)
    trainer = CaptionTrainer(contender.model, phase.config, dropout=phase.dropout)
    batches = endless(phase_batches(phase, contender.job, contender.data, contender.model))

    def run(steps: int) -> float:
        started = time.perf_counter()
        trainer.train_epoch(itertools.islice(batches, steps), steps)
        return time.perf_counter() - started

    return run, phase.config.batch_size


def interleaved(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Seconds of every run, `rounds` times, alternating between the runs (the order flips every round)."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds):
        for name in (list(runs) if round_ % 2 == 0 else list(reversed(runs))):
            seconds[name].append(runs[name]())
    return seconds


def measure_training(contenders: dict[str, Contender], phase: str, steps: int, warmup: int,
                     rounds: int) -> Measurement:
    """`steps` steps of `phase` for each model after `warmup` untimed ones, in `rounds` alternating rounds."""
    runs, batch = {}, 0
    for name, c in contenders.items():
        progress(f"  {phase}: {name} warm-up ({warmup} steps)")
        run, batch = training_run(c, phase)
        run(warmup)
        runs[name] = lambda run=run: run(steps // rounds)
    progress(f"  {phase}: {rounds} rounds of {steps // rounds} steps per model")
    seconds = interleaved(runs, rounds)
    data, job = contenders["merge"].data, contenders["merge"].job  # the same captions and batch sizes in both
    if phase == "xe":
        captions_per_image = len(data.train) / len(data.train_ids)
        images_per_step = batch / captions_per_image
        note = (f"{steps} steps of {batch} captions (= {images_per_step:.1f} images of {captions_per_image:g} "
                f"captions), label smoothing {job.train.label_smoothing}")
    else:
        images_per_step = batch
        note = (f"{steps} steps of {batch} images x {job.scst.samples} sampled captions (max length "
                f"{job.scst.max_length}), CIDEr-D rewards, baseline {job.scst.baseline}")
    return Measurement(phase, images_per_step * (steps // rounds), seconds, note)


class WithoutEnd:
    """A decoder's decoding interface (`imgcap.model.beam.StepModel`) under which no caption ever ends: `<end>`
    gets no probability, so every search takes exactly its `max_length` steps whatever the model has learned."""

    def __init__(self, model: Decoder) -> None:
        self.model, self.vocab_size, self.feature_dim = model, model.vocab_size, model.feature_dim

    def initial_state(self, features: Any) -> Any:
        return self.model.initial_state(features)

    def step(self, tokens: Any, image: Any, state: Any) -> tuple[Any, Any]:
        import tensorflow as tf

        from imgcap.data.text import END_ID

        logits, state = self.model.step(tokens, image, state)
        return logits + tf.one_hot(END_ID, self.vocab_size, on_value=-1e9), state


def measure_decoding(contenders: dict[str, Contender], beam_width: int, length: int, images: int,
                     rounds: int) -> Measurement:
    """Beam search of exactly `length` steps (`WithoutEnd`) over the first `images` dev images per model,
    `rounds` alternating times, after an untimed pass over them (the graph's trace)."""
    from imgcap.model.beam import make_decoder

    runs, decode = {}, None
    for name, c in contenders.items():
        decode = dataclasses.replace(c.job.decode, beam_width=beam_width, max_length=length)
        decoder = make_decoder(WithoutEnd(c.model), decode)
        features = c.data.features.select(c.data.dev_ids[:images]).features
        progress(f"  decoding: {name} warm-up ({len(features)} images)")
        decoder.decode(features)
        runs[name] = lambda decoder=decoder, features=features: timed(lambda: decoder.decode(features))
    progress(f"  decoding: {rounds} rounds of {images} images per model")
    seconds = interleaved(runs, rounds)
    note = (f"{decode.label}, {length} steps per caption (<end> suppressed), batch {decode.batch_size}, "
            f"{images} dev images")
    return Measurement("decode", images, seconds, note)


def timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def format_table(measurements: list[Measurement]) -> str:
    """The measurements as a Markdown table: images/s of each model and the cost ratio per image."""
    titles = {"xe": "cross-entropy training", "decode": "beam-search decoding", "scst": "self-critical training"}
    lines = [("| measurement | merge images/s | attention images/s | attention cost per image (x merge) | "
              "per round | details |"), "|---|---:|---:|---:|---|---|"]
    for m in measurements:
        rounds = ", ".join(f"{r:.2f}" for r in m.round_ratios)
        lines.append(f"| {titles[m.name]} | {m.images_per_second('merge'):.1f} | "
                     f"{m.images_per_second('attention'):.1f} | **{m.cost_ratio:.2f}x** | {rounds} | {m.note} |")
    return "\n".join(lines)


def describe(contenders: dict[str, Contender]) -> list[str]:
    """One line per model: architecture, sizes, features, vocabulary."""
    lines = []
    for name, c in contenders.items():
        m = c.job.model
        size = f"units {m.units}, embedding {m.embedding_dim}"
        if m.architecture == "attention":
            size += f", attention_dim {m.attention_dim}, {c.data.regions} regions"
        lines.append(f"- {name} ({CONFIGS[name].relative_to(ROOT)}): {size}; {c.data.features.dim}-d "
                     f"{c.data.features.features.dtype} features from {c.features}; vocabulary {len(c.data.vocab)}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=80, help="timed cross-entropy steps per model")
    parser.add_argument("--scst-steps", type=int, default=8, help="timed self-critical steps per model")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before each phase's timing")
    parser.add_argument("--decode-images", type=int, default=1000, help="dev images decoded per round (1000: all)")
    parser.add_argument("--beam-width", type=int, default=3)
    parser.add_argument("--decode-length", type=int, default=16,
                        help="search steps per caption (16: the 90th percentile of Flickr8k dev references' words)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per measurement")
    parser.add_argument("--output", type=Path, help="also write the table and the raw figures as JSON here")
    args = parser.parse_args(argv)
    for flag in ("train_steps", "scst_steps"):
        if getattr(args, flag) % args.rounds or getattr(args, flag) < args.rounds:
            parser.error(f"--{flag.replace('_', '-')} must be a multiple of --rounds ({args.rounds})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = load_average()
    progress("loading features and building both models ...")
    contenders = {name: contender(name) for name in ARCHITECTURES}
    vocab_sizes = {len(c.data.vocab) for c in contenders.values()}
    if len(vocab_sizes) != 1:
        sys.exit(f"the two configs built different vocabularies ({sorted(vocab_sizes)}): not comparable")
    measurements = [measure_training(contenders, "xe", args.train_steps, args.warmup_steps, args.rounds),
                    measure_decoding(contenders, args.beam_width, args.decode_length, args.decode_images, args.rounds),
                    measure_training(contenders, "scst", args.scst_steps, args.warmup_steps, args.rounds)]
    import tensorflow as tf

    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    table = "\n".join([
        f"Attention vs merge, per image, one process, {os.cpu_count()} CPUs, TensorFlow {tf.__version__}",
        f"load average (1/5/15 min): {load_start} at start, {load_average()} at end", f"command: {command}", "",
        *describe(contenders), "", format_table(measurements)])
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({
            "command": command, "table": table,
            "measurements": [{**dataclasses.asdict(m), "cost_ratio": m.cost_ratio,
                              "images_per_second": {n: m.images_per_second(n) for n in ARCHITECTURES}}
                             for m in measurements]}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
