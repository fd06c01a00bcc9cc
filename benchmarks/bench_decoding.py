"""What banning repeated n-grams costs in beam search: the same bundle, images and beam, with and without
`decode.no_repeat_ngram_size`, side by side in one process.

    .venv/bin/python benchmarks/bench_decoding.py                    # the packaged model on 512 dev grids
    .venv/bin/python benchmarks/bench_decoding.py --bundle runs/train_flickr8k/bundle \\
        --features ../shared/flickr8k/features_mobilenet_v2.npz --images 1000

Decodes the first `--images` dev images of `--features` (default: the EfficientNet-Lite2 grids of
runs/features_lite2_grid, which the packaged model reads) with the bundle's decoding, once with the ban it
records (or `--ngram`, default 2) and once with it off, after one untimed pass of each (the graph's trace).
The machine may be shared, so each runs in `--rounds` rounds that alternate the two (the order flips every
round); the cost ratio comes from the summed seconds. Searches run until the last beam of a batch has ended,
so both cases decode the captions their rules allow: the ratio is the cost per image as users meet it.
Starts no Ray; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgcap.runtime.logs import import_tensorflow  # noqa: E402

import_tensorflow()  # before the imports below bring it in: without TensorFlow's CPU-machine start-up lines

from imgcap.data.captions import read_split_file  # noqa: E402
from imgcap.data.feature_table import load_features  # noqa: E402
from imgcap.model.bundle import load_bundle  # noqa: E402

DEV_SPLIT = ROOT.parent / "shared" / "flickr8k" / "Flickr_8k.devImages.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="imgcap:flickr8k")
    parser.add_argument("--features", default=str(ROOT / "runs" / "features_lite2_grid"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--ngram", type=int, default=0, help="the n banned (default: the bundle's, else 2)")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    table = load_features(args.features)
    table = table.select(sorted(set(read_split_file(DEV_SPLIT)) & set(table.ids))[: args.images])
    n = args.ngram or bundle.decode.no_repeat_ngram_size or 2
    cases = {"repeats allowed": dataclasses.replace(bundle.decode, no_repeat_ngram_size=0),
             f"no repeated {n}-grams": dataclasses.replace(bundle.decode, no_repeat_ngram_size=n)}
    seconds = {name: 0.0 for name in cases}
    for decode in cases.values():
        bundle.decoder(decode).decode(table.features)  # trace the graph, untimed
    load_before = os.getloadavg()
    for round_ in range(args.rounds):
        for name in (list(cases) if round_ % 2 == 0 else list(reversed(cases))):
            started = time.perf_counter()
            bundle.decoder(cases[name]).decode(table.features)
            seconds[name] += time.perf_counter() - started
    load_after = os.getloadavg()

    base = seconds["repeats allowed"]
    rows = [f"| {name} | {len(table.ids) * args.rounds / spent:.1f} | {spent / base:.2f} |"
            for name, spent in seconds.items()]
    print("\n".join([
        f"beam search of {len(table.ids)} dev images x {args.rounds} rounds, bundle {args.bundle} "
        f"({bundle.decode.label}), features {args.features}",
        f"load average (1 min): {load_before[0]:.1f} at start, {load_after[0]:.1f} at end", "",
        "| decoding | images/s | cost per image (x repeats allowed) |", "|---|---:|---:|", *rows]))

if __name__ == "__main__":
    main()
