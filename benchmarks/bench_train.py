"""Training throughput in one run: the seed baseline, the single-process trainer and the Ray Train job.

    python benchmarks/bench_train.py                       # full Flickr8k train split (shared features)
    python benchmarks/bench_train.py --epochs 1 --seed-steps 100

All on the same features (configs/train_flickr8k.toml: MobileNetV2 .npz, 6000 train images, merge model
256/256, global batch 64):

- seed: /work/shared/baselines/seed_merge.py (per-prefix samples, one-hot targets, Keras fit on a Python
  generator), `--max-train-steps N --epochs 1`; images/s = 1 / its `train_s_per_image`;
- single process: `CaptionTrainer` with no strategy (TensorFlow uses every core), `--epochs` cross-entropy
  epochs, then `--scst-epochs` self-critical epochs of the same model (``[scst]`` of the config, enabled here:
  sampling k captions per image, CIDEr-D rewards, the weighted step), one row per phase;
- Ray Train with 1 and 2 workers (`imgcap.train.ray_job.train_on_ray`, 1 CPU each), same global batch.

images/s = training images per epoch / seconds of training in the epoch (dev evaluation excluded), taken from
the last epoch (the first includes tracing the step function); the Ray job's wall time (start-up of the
workers, all epochs, evaluation, bundle) is listed separately. Starts its own local Ray unless RAY_ADDRESS is
set. Prints a Markdown table and writes it with the raw figures as JSON (--output).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgcap.config.loader import load_config  # noqa: E402
from imgcap.config.training import TrainJobConfig  # noqa: E402

SEED_SCRIPT = ROOT.parent / "shared" / "baselines" / "seed_merge.py"


def run_seed(config: TrainJobConfig, steps: int) -> dict:
    command = [sys.executable, str(SEED_SCRIPT), "--features", config.data.features, "--captions",
               config.data.captions, "--train", config.data.train_split, "--test", config.data.dev_split,
               "--epochs", "1", "--max-train-steps", str(steps), "--max-test-images", "5"]
    started = time.perf_counter()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    return {"images_per_second": 1.0 / figures["train_s_per_image"], "wall_s": time.perf_counter() - started,
            "note": f"{steps} generator steps (1 image each)", "raw": figures}


def run_single_process(config: TrainJobConfig) -> dict[str, dict]:
    """Both phases in this process, as `imgcap train` runs them; one row per phase."""
    from imgcap.data.dataset import prepare_training_data
    from imgcap.model.decoder import build_model
    from imgcap.train.batches import phase_batches, phase_sizes
    from imgcap.train.evaluation import dev_evaluator
    from imgcap.train.loop import train_phase
    from imgcap.train.state import TrainingState, training_phases
    from imgcap.train.trainer import CaptionTrainer

    data = prepare_training_data(config.data, config.text)
    model = build_model(config.model, data.vocab, data.features.dim, config.train.seed, data.regions)
    evaluator = dev_evaluator(config, data, model)
    phases = training_phases(config)
    state, rows = TrainingState(phases[0].name), {}
    for phase in phases:
        started = time.perf_counter()
        state.begin(phase.name)
        trainer = CaptionTrainer(model, phase.config, dropout=phase.dropout)
        images, captions = phase_sizes(phase, config, data)
        history = list(train_phase(trainer, evaluator, state, phase_batches(phase, config, data, model),
                                   num_images=images, num_captions=captions))
        trainer.restore_best()
        label = ("cross-entropy" if phase.name == "xe"
                 else f"self-critical, {config.scst.samples} samples per image, batch {config.scst.batch_size} images")
        rows[f"single process (CaptionTrainer), {phase.name}"] = {
            "images_per_second": history[-1].images_per_second, "wall_s": time.perf_counter() - started,
            "first_epoch_images_per_second": history[0].images_per_second,
            "note": f"{label}: {len(history)} epoch(s), all cores, {history[-1].captions_per_second:.0f} captions/s",
            "history": [h.as_dict() for h in history]}
    return rows


def run_ray(config: TrainJobConfig, workers: int) -> dict:
    from imgcap.train.ray_job import train_on_ray

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        job = dataclasses.replace(config, output_dir=tmp,
                                  ray=dataclasses.replace(config.ray, num_workers=workers, storage_path="",
                                                          run_name="", resume_from=None))
        started = time.perf_counter()
        result = train_on_ray(job)
        wall = time.perf_counter() - started
    return {"images_per_second": result.history[-1].images_per_second, "wall_s": wall,
            "first_epoch_images_per_second": result.history[0].images_per_second,
            "note": f"{len(result.history)} epoch(s), {workers} x {config.ray.cpus_per_worker} CPU, "
                    f"batch {config.train.batch_size // workers} per worker",
            "history": [h.as_dict() for h in result.history]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "train_flickr8k.toml"))
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the single-process and Ray runs")
    parser.add_argument("--scst-epochs", type=int, default=1, help="self-critical epochs of the single-process run")
    parser.add_argument("--seed-steps", type=int, default=200, help="training steps of the seed baseline")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Train runs")
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_train.json"))
    args = parser.parse_args(argv)
    config = load_config(TrainJobConfig, args.config, {
        "train.epochs": args.epochs, "train.select_by": "loss", "train.patience": 0, "decode.beam_width": 1,
        "scst.enabled": True, "scst.epochs": args.scst_epochs, "scst.patience": 0})
    if not Path(config.data.features).is_file() or not SEED_SCRIPT.is_file():
        print(f"needs {config.data.features} and {SEED_SCRIPT} (the shared data)", file=sys.stderr)
        return 2

    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    # The Ray runs train cross-entropy only (the phase the seed has); the single process runs both phases.
    xe_only = dataclasses.replace(config, scst=dataclasses.replace(config.scst, enabled=False))
    runs = [("seed baseline (seed_merge.py)", lambda: {"": run_seed(config, args.seed_steps)}),
            ("single process", lambda: run_single_process(config))]
    if not args.no_ray:
        runs += [("Ray Train, 1 worker", lambda: {"": run_ray(xe_only, 1)}),
                 ("Ray Train, 2 workers", lambda: {"": run_ray(xe_only, 2)})]
    rows = {}
    for name, run in runs:
        print(f"running: {name} ...", file=sys.stderr, flush=True)
        for key, row in run().items():
            rows[key or name] = row
            print(f"  {key or name}: {row['images_per_second']:.1f} images/s", file=sys.stderr, flush=True)
    seed = rows["seed baseline (seed_merge.py)"]["images_per_second"]
    lines = [f"Training throughput, {Path(config.data.features).name}, global batch {config.train.batch_size}, "
             f"{os.cpu_count()} CPUs, Ray {ray.__version__}",
             "", "| trainer | images/s (last epoch) | x seed | first epoch images/s | wall s | notes |",
             "|---|---:|---:|---:|---:|---|"]
    for name, row in rows.items():
        first = row.get("first_epoch_images_per_second")
        lines.append(f"| {name} | {row['images_per_second']:.1f} | {row['images_per_second'] / seed:.1f} | "
                     f"{'' if first is None else f'{first:.1f}'} | {row['wall_s']:.0f} | {row['note']} |")
    table = "\n".join(lines)
    print(table)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                                  "table": table, "rows": rows}, indent=2, default=str), encoding="utf-8")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
