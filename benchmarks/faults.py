"""Faults injected into real jobs, and what they cost: rows lost (must be 0), duplicates (must be 0), extra seconds.

    python benchmarks/faults.py                  # 300 images (the shared Flickr8k samples, else demo scenes)
    python benchmarks/faults.py --images 120 --skip-multi-node

Each scenario runs a job once clean and once with one fault, on the same images, in this run (the machine may
be shared: compare the two seconds columns of a row, not rows of different runs):

- extraction (images -> features; MobileNetV2 with the shared weights, else the parameter-free thumbnail):
  a CNN actor killed on its 3rd batch (``os._exit``); a read task failing once with a transient error;
- images -> captions (a real, untrained decoder over thumbnail features: what is measured is the rows):
  the captioner actor killed on its 3rd batch; the driver SIGKILLed when half of the output files exist,
  then the same command rerun (seconds = killed run + rerun);
- extraction from S3 (moto's server on 127.0.0.1) through tests/flaky_s3.py, a proxy failing one request in 10
  with 500 / 503 SlowDown / 503 (versus the same bucket without the proxy);
- multi-node (`ray.cluster_utils.Cluster`, a head and two 2-CPU worker nodes): a worker node removed without
  grace while a CNN batch runs on it (versus the same cluster left alone).

Faults come from imgcap.fault_injection (a test-only hook armed through a file). Prints a Markdown table and
writes it with the raw figures as JSON (--output).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the flaky S3 proxy is the tests' own

from imgcap.caption_job import run_caption_job  # noqa: E402
from imgcap.config import CaptionJobConfig, CnnConfig, ExtractConfig, S3Config, SourceConfig  # noqa: E402
from imgcap.extract_job import extract_features  # noqa: E402
from imgcap.fault_injection import FAULTS_ENV  # noqa: E402
from imgcap.sinks import OutputDirectory  # noqa: E402
from imgcap.sources import S3Options  # noqa: E402
from imgcap.synthetic import make_shapes_dataset, untrained_bundle  # noqa: E402

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


def ids_in(uri: str, s3: S3Options = S3Options()) -> list[str]:
    import pyarrow.parquet as pq

    output = OutputDirectory(uri, s3)
    return [i for path in output.files()
            for i in pq.read_table(path, columns=["image_id"], filesystem=output.filesystem)["image_id"].to_pylist()]


class Faults:
    """The fault file every Ray worker of this benchmark reads (imgcap.fault_injection)."""

    def __init__(self, root: Path) -> None:
        self.file = root / "faults.txt"
        self.root = root
        self.count = 0

    def arm(self, stage: str, batch: int, mode: str = "") -> Path:
        self.count += 1
        marker = self.root / f"marker{self.count}"
        self.file.write_text(f"{stage}:{batch}:{marker}{':' + mode if mode else ''}\n", encoding="utf-8")
        return marker

    def disarm(self) -> None:
        self.file.unlink(missing_ok=True)


def timed(run: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = run()
    return result, time.perf_counter() - started


def recovered(result: Any) -> str:
    return result.recovery.format().removeprefix("recovered: ") if result.recovery is not None else "(not known)"


def extraction_scenarios(root: Path, images: Path, expected: int, faults: Faults, backbone: str) -> list[Row]:
    weights = {"weights_file": str(WEIGHTS)} if backbone == "mobilenet_v2" else {"weights": "none"}

    def extract(name: str) -> tuple[Any, float, str]:
        out = str(root / name)
        summary, seconds = timed(lambda: extract_features(ExtractConfig(
            sources=[SourceConfig(str(images))], output_dir=out, backbone=backbone, batch_size=16, shard_size=16,
            rows_per_file=32, **weights)))
        return summary, seconds, out

    progress("extraction: clean")
    _, clean_s, _ = extract("extract_clean")
    rows = []
    for fault, (stage, batch, mode) in {"CNN actor killed (3rd batch)": ("cnn", 3, ""),
                                         "read task fails once (transient)": ("read", 2, "raise")}.items():
        progress(f"extraction: {fault}")
        marker = faults.arm(stage, batch, mode)
        summary, seconds, out = extract(f"extract_{stage}")
        faults.disarm()
        assert marker.exists(), f"the fault {fault} did not happen"
        ids = ids_in(out)
        rows.append(Row(f"extraction ({backbone})", fault, expected, len(ids), len(ids) - len(set(ids)), clean_s,
                        seconds, recovered(summary)))
    return rows


def caption_config(root: Path, name: str, images: Path, bundle: str) -> CaptionJobConfig:
    return CaptionJobConfig(bundle=bundle, sources=[SourceConfig(str(images))], output_dir=str(root / name),
                            cnn=CnnConfig(weights="none", batch_size=16), shard_size=16, rows_per_file=16)


def caption_scenarios(root: Path, images: Path, expected: int, faults: Faults, bundle: str) -> list[Row]:
    progress("images -> captions: clean")
    _, clean_s = timed(lambda: run_caption_job(caption_config(root, "captions_clean", images, bundle)))
    progress("images -> captions: captioner actor killed")
    marker = faults.arm("caption", 3)
    result, seconds = timed(lambda: run_caption_job(caption_config(root, "captions_actor", images, bundle)))
    faults.disarm()
    assert marker.exists()
    ids = ids_in(str(root / "captions_actor" / "captions"))
    rows = [Row("images -> captions", "captioner actor killed (3rd batch)", expected, len(ids),
                len(ids) - len(set(ids)), clean_s, seconds, recovered(result))]

    progress("images -> captions: driver SIGKILLed half-way, rerun")
    import ray

    config_file = root / "caption.toml"
    config_file.write_text(f'bundle = "{bundle}"\noutput_dir = "{root / "captions_killed"}"\nshard_size = 16\n'
                           f'rows_per_file = 16\n[[sources]]\npath = "{images}"\n[cnn]\nweights = "none"\n'
                           f'batch_size = 16\n', encoding="utf-8")
    env = {**os.environ, **FAKE_AWS, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "jobs" / "caption.py"), "--config", str(config_file)]
    captions = OutputDirectory(str(root / "captions_killed" / "captions"), S3Options())
    half = (expected // 16) // 2
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and len(captions.files()) < half:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written_before_kill = len(captions.files())
    rerun = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ids = ids_in(str(root / "captions_killed" / "captions"))
    skipped = next((line.strip() for line in rerun.stdout.splitlines() if "already captioned" in line), "")
    rows.append(Row("images -> captions", f"driver SIGKILLed after {written_before_kill} files, same command rerun",
                    expected, len(ids), len(ids) - len(set(ids)), clean_s, seconds, f"rerun: {skipped}"))
    return rows


def s3_scenario(root: Path, images: Path, expected: int) -> list[Row]:
    import boto3
    from flaky_s3 import FlakyS3Proxy
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="faults")
    for path in sorted(images.iterdir()):
        client.put_object(Bucket="faults", Key=f"photos/{path.name}", Body=path.read_bytes())
    proxy = FlakyS3Proxy(endpoint, fail_every=10).start()
    try:
        def extract(out: str, url: str) -> tuple[Any, float]:
            return timed(lambda: extract_features(ExtractConfig(
                sources=[SourceConfig("s3://faults/photos")], output_dir=out, backbone="thumbnail", weights="none",
                batch_size=16, shard_size=16, rows_per_file=32, s3=S3Config(endpoint_url=url))))

        progress("S3: clean")
        _, clean_s = extract("s3://faults/clean", endpoint)
        progress("S3: 1 request in 10 failing")
        summary, seconds = extract("s3://faults/flaky", proxy.url)
        ids = ids_in("s3://faults/flaky", S3Options(endpoint_url=endpoint))
        return [Row("extraction from S3 (thumbnail)",
                    f"1 request in 10 answered 500/503 ({proxy.failed} of {proxy.requests})", expected, len(ids),
                    len(ids) - len(set(ids)), clean_s, seconds, recovered(summary))]
    finally:
        proxy.stop()
        server.stop()


def multi_node_scenario(root: Path, images: Path, expected: int, faults: Faults, backbone: str) -> list[Row]:
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    env = {**FAKE_AWS, "TF_CPP_MIN_LOG_LEVEL": "2", FAULTS_ENV: str(faults.file)}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": env})
    workers = [cluster.add_node(num_cpus=2, env_vars=env) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
    weights = {"weights_file": str(WEIGHTS)} if backbone == "mobilenet_v2" else {"weights": "none"}
    try:
        def extract(out: str) -> tuple[Any, float]:
            return timed(lambda: extract_features(ExtractConfig(
                sources=[SourceConfig(str(images))], output_dir=out, backbone=backbone, batch_size=16,
                shard_size=16, rows_per_file=32, **weights)))

        progress("multi-node: clean")
        _, clean_s = extract(str(root / "nodes_clean"))
        progress("multi-node: a worker node removed mid-job")
        marker = faults.arm("cnn", 3, "pause")

        def strike() -> None:
            while not marker.exists() or not marker.read_text():
                time.sleep(0.05)
            node_id = json.loads(marker.read_text())["node_id"]
            cluster.remove_node(next(w for w in workers if w.node_id == node_id), allow_graceful=False)

        striker = threading.Thread(target=strike, daemon=True)
        striker.start()
        summary, seconds = extract(str(root / "nodes_removed"))
        faults.disarm()
        striker.join(timeout=60)
        ids = ids_in(str(root / "nodes_removed"))
        return [Row(f"extraction ({backbone}), 3-node cluster", "a worker node removed mid-batch", expected,
                    len(ids), len(ids) - len(set(ids)), clean_s, seconds, recovered(summary))]
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
