"""Faults injected into real jobs, and what they cost: rows lost (must be 0), duplicates (must be 0), extra seconds.

    python benchmarks/faults.py                  # 300 images (the shared Flickr8k samples, else demo scenes)
    python benchmarks/faults.py --images 120 --skip-multi-node

Each scenario runs a job once to warm up (untimed), once clean and once with one fault, on the same images, in
this run (the machine may be shared: compare the two seconds columns of a row, not rows of different runs):

- extraction (images -> features; MobileNetV2 with the shared weights, else the parameter-free thumbnail):
  a CNN actor killed on its 3rd batch (``os._exit``); a read task failing once with a transient error;
- images -> captions (a real, untrained decoder over thumbnail features: what is measured is the rows):
  the captioner actor killed on its 3rd batch; the driver SIGKILLed when half of the output files exist,
  then the same command rerun (seconds = killed run + rerun);
- extraction from S3 (moto's server on 127.0.0.1) through imgcap/testing/flaky_s3.py, a proxy failing one request in 10
  with 500 / 503 SlowDown / 503 (versus the same bucket without the proxy);
- multi-node (`ray.cluster_utils.Cluster`, a head and two 2-CPU worker nodes): a worker node removed without
  grace while a CNN batch runs on it (versus the same cluster left alone).

Faults come from imgcap.runtime.fault_injection (a test-only hook armed through a file). Prints a Markdown table and
writes it with the raw figures as JSON (--output).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgcap.batch.caption import run_caption_job  # noqa: E402
from imgcap.batch.extract import extract_features  # noqa: E402
from imgcap.config.jobs import (
    CaptionJobConfig,
    CnnConfig,
    ExtractConfig,
    S3Config,
    SourceConfig,
)
from imgcap.data.synthetic import make_shapes_dataset  # noqa: E402
from imgcap.io.outputs import OutputDirectory  # noqa: E402
from imgcap.io.storage import S3Options  # noqa: E402
from imgcap.runtime.fault_injection import FAULTS_ENV  # noqa: E402
from imgcap.testing.fault_harness import (  # noqa: E402
    armed,
    output_ids,
    remove_node_on_marker,
    run_killed,
    three_node_cluster,
)
from imgcap.testing.fixtures import free_ports, untrained_bundle  # noqa: E402

SHARED = ROOT.parent / "shared"
SHARED_IMAGES = SHARED / "flickr8k" / "Images"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Row:
    scenario: str
    fault: str
    inputs: int
    rows: int
    duplicates: int
    clean_s: float
    faulted_s: float
    recovered: str

    @property
    def lost(self) -> int:
        return self.inputs - (self.rows - self.duplicates)

    def markdown(self) -> str:
        return (f"| {self.scenario} | {self.fault} | {self.inputs} | {self.lost} | {self.duplicates} | "
                f"{self.clean_s:.1f} | {self.faulted_s:.1f} | {self.faulted_s - self.clean_s:+.1f} | {self.recovered} |")


def progress(message: str) -> None:
    print(f"[faults] {message}", file=sys.stderr, flush=True)


class Faults:
    """The fault file every Ray worker of this benchmark reads, and a fresh marker file per fault."""

    def __init__(self, root: Path) -> None:
        self.file = root / "faults.txt"
        self.root = root
        self.count = 0

    def spec(self, stage: str, batch: int, mode: str = "") -> tuple[str, Path]:
        """A fault line for imgcap.runtime.fault_injection (arm it with `fault_harness.armed`), and its marker file."""
        self.count += 1
        marker = self.root / f"marker{self.count}"
        return f"{stage}:{batch}:{marker}{':' + mode if mode else ''}", marker


def timed(run: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = run()
    return result, time.perf_counter() - started


def clean_seconds(run: Callable[[str], Any], name: str) -> float:
    """Seconds of a clean `run(output name)`, timed after one untimed warm-up run: the first job of a scenario
    also pays for worker processes starting, imports and a cold page cache, which the faulted run then does not
    (without it a fault could look like it saved time)."""
    progress(f"{name}: warm-up, then clean")
    run(f"{name}_warmup")
    return timed(lambda: run(name))[1]


def recovered(result: Any) -> str:
    return result.recovery.format().removeprefix("recovered: ") if result.recovery is not None else "(not known)"


def row(scenario: str, fault: str, expected: int, ids: list[str], clean_s: float, faulted_s: float,
        what: str) -> Row:
    return Row(scenario, fault, expected, len(ids), len(ids) - len(set(ids)), clean_s, faulted_s, what)


def extraction_scenarios(root: Path, images: Path, expected: int, faults: Faults, backbone: str) -> list[Row]:
    weights = {"weights_file": str(WEIGHTS)} if backbone == "mobilenet_v2" else {"weights": "none"}

    def extract(name: str) -> Any:
        return extract_features(ExtractConfig(
            sources=[SourceConfig(str(images))], output_dir=str(root / name), backbone=backbone, batch_size=16,
            shard_size=16, rows_per_file=32, **weights))

    clean_s = clean_seconds(extract, "extract_clean")
    rows = []
    for fault, (stage, batch, mode) in {"CNN actor killed (3rd batch)": ("cnn", 3, ""),
                                         "read task fails once (transient)": ("read", 2, "raise")}.items():
        progress(f"extraction: {fault}")
        spec, marker = faults.spec(stage, batch, mode)
        with armed(faults.file, spec):
            summary, seconds = timed(lambda: extract(f"extract_{stage}"))
        assert marker.exists(), f"the fault {fault} did not happen"
        rows.append(row(f"extraction ({backbone})", fault, expected, output_ids(str(root / f"extract_{stage}")),
                        clean_s, seconds, recovered(summary)))
    return rows


def caption_scenarios(root: Path, images: Path, expected: int, faults: Faults, bundle: str) -> list[Row]:
    import ray

    def caption(name: str) -> Any:
        return run_caption_job(CaptionJobConfig(
            bundle=bundle, sources=[SourceConfig(str(images))], output_dir=str(root / name),
            cnn=CnnConfig(weights="none", batch_size=16), shard_size=16, rows_per_file=16))

    clean_s = clean_seconds(caption, "captions_clean")
    progress("images -> captions: captioner actor killed")
    spec, marker = faults.spec("caption", 3)
    with armed(faults.file, spec):
        result, seconds = timed(lambda: caption("captions_actor"))
    assert marker.exists(), "the captioner actor was not killed"
    rows = [row("images -> captions", "captioner actor killed (3rd batch)", expected,
                output_ids(str(root / "captions_actor" / "captions")), clean_s, seconds, recovered(result))]

    progress("images -> captions: driver SIGKILLed half-way, rerun")
    config_file = root / "caption.toml"
    config_file.write_text(f'bundle = "{bundle}"\noutput_dir = "{root / "captions_killed"}"\nshard_size = 16\n'
                           f'rows_per_file = 16\n[[sources]]\npath = "{images}"\n[cnn]\nweights = "none"\n'
                           f'batch_size = 16\n', encoding="utf-8")
    env = {**os.environ, **FAKE_AWS, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "jobs" / "caption.py"), "--config", str(config_file)]
    captions = OutputDirectory(str(root / "captions_killed" / "captions"), S3Options())
    half = (expected // 16) // 2
    killed_s = run_killed(command, env, ROOT, lambda: len(captions.files()) >= half)
    written_before_kill = len(captions.files())
    rerun, rerun_s = timed(lambda: subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    skipped = next((line.strip() for line in rerun.stdout.splitlines() if "already captioned" in line), "")
    rows.append(row("images -> captions", f"driver SIGKILLed after {written_before_kill} files, same command rerun",
                    expected, output_ids(str(root / "captions_killed" / "captions")), clean_s, killed_s + rerun_s,
                    f"rerun: {skipped}"))
    return rows


def s3_scenario(root: Path, images: Path, expected: int) -> list[Row]:
    import boto3
    from moto.server import ThreadedMotoServer

    from imgcap.testing.flaky_s3 import FlakyS3Proxy

    port = free_ports()[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="faults")
    for path in sorted(images.iterdir()):
        client.put_object(Bucket="faults", Key=f"photos/{path.name}", Body=path.read_bytes())
    proxy = FlakyS3Proxy(endpoint, fail_every=10).start()
    try:
        def extract(name: str, url: str = endpoint) -> Any:
            return extract_features(ExtractConfig(
                sources=[SourceConfig("s3://faults/photos")], output_dir=f"s3://faults/{name}", backbone="thumbnail",
                weights="none", batch_size=16, shard_size=16, rows_per_file=32, s3=S3Config(endpoint_url=url)))

        clean_s = clean_seconds(extract, "clean")
        progress("S3: 1 request in 10 failing")
        summary, seconds = timed(lambda: extract("flaky", proxy.url))
        return [row("extraction from S3 (thumbnail)",
                    f"1 request in 10 answered 500/503 ({proxy.failed} of {proxy.requests})", expected,
                    output_ids("s3://faults/flaky", S3Options(endpoint_url=endpoint)), clean_s, seconds,
                    # the AWS SDK retries a failed request inside the read: Ray sees none of it
                    f"S3 requests retried by the AWS SDK: {proxy.failed}; Ray: {recovered(summary)}")]
    finally:
        proxy.stop()
        server.stop()


def multi_node_scenario(root: Path, images: Path, expected: int, faults: Faults, backbone: str) -> list[Row]:
    import ray

    ray.shutdown()
    cluster, workers = three_node_cluster({**FAKE_AWS, "TF_CPP_MIN_LOG_LEVEL": "2", FAULTS_ENV: str(faults.file)})
    weights = {"weights_file": str(WEIGHTS)} if backbone == "mobilenet_v2" else {"weights": "none"}
    try:
        def extract(name: str) -> Any:
            return extract_features(ExtractConfig(
                sources=[SourceConfig(str(images))], output_dir=str(root / name), backbone=backbone, batch_size=16,
                shard_size=16, rows_per_file=32, **weights))

        clean_s = clean_seconds(extract, "nodes_clean")
        progress("multi-node: a worker node removed mid-job")
        spec, marker = faults.spec("cnn", 3, "pause")  # the CNN actor holds its 3rd batch while its node goes
        striker = remove_node_on_marker(cluster, workers, marker)
        with armed(faults.file, spec):
            summary, seconds = timed(lambda: extract("nodes_removed"))
        striker.join(timeout=60)
        assert marker.exists(), "no node was removed"
        return [row(f"extraction ({backbone}), 3-node cluster", "a worker node removed mid-batch", expected,
                    output_ids(str(root / "nodes_removed")), clean_s, seconds, recovered(summary))]
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--skip-multi-node", action="store_true")
    parser.add_argument("--output", default="runs/bench_faults.json")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory(prefix="imgcap_faults_") as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        if SHARED_IMAGES.is_dir():
            for path in sorted(SHARED_IMAGES.glob("*.jpg"))[:args.images]:
                (images / path.name).symlink_to(path)
        else:
            demo = make_shapes_dataset(root / "demo", num_images=args.images)
            for path in sorted(Path(demo.images).glob("*.jpg")):
                (images / path.name).symlink_to(path)
        expected = len(list(images.iterdir()))
        backbone = "mobilenet_v2" if WEIGHTS.is_file() else "thumbnail"
        bundle = untrained_bundle(root / "bundle")
        faults = Faults(root)
        ray.init(address="local", num_cpus=2, log_to_driver=False,
                 runtime_env={"env_vars": {**FAKE_AWS, "TF_CPP_MIN_LOG_LEVEL": "2", FAULTS_ENV: str(faults.file)}})
        os.environ.update(FAKE_AWS)
        rows = extraction_scenarios(root, images, expected, faults, backbone)
        rows += caption_scenarios(root, images, expected, faults, bundle)
        rows += s3_scenario(root, images, expected)
        if not args.skip_multi_node:
            rows += multi_node_scenario(root, images, expected, faults, backbone)
        ray.shutdown()

    table = ["| job | fault injected | inputs | rows lost | duplicates | clean s | with fault s | extra s | "
             "what was retried |", "|---|---|---:|---:|---:|---:|---:|---:|---|"] + [r.markdown() for r in rows]
    print("\n".join(table))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"rows": [{**r.__dict__, "lost": r.lost} for r in rows],
                                             "markdown": table}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
