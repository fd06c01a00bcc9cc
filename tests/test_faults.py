"""Nothing lost under faults: actors killed mid-job, a read task failing, S3 answering 500/503/SlowDown, a node
removed from a multi-node Ray cluster, drivers SIGKILLed and the same command rerun.

Every fault is real: processes exit with ``os._exit`` (imgcap.runtime.fault_injection), the flaky S3 is an HTTP proxy
in front of moto's server (imgcap/testing/flaky_s3.py), the node is a raylet of a `ray.cluster_utils.Cluster` removed
without grace, the drivers are `jobs/*.py` processes killed with SIGKILL. Each test then checks that every
input is in the output exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from _imaging import jpeg_bytes, write_jpegs
from conftest import FAULTS_FILE, TEST_WORKER_ENV, start_local_ray
from toy import write_toy_job_files

from imgcap.batch.caption import run_caption_job
from imgcap.batch.extract import extract_features
from imgcap.config.jobs import (
    CaptionJobConfig,
    CnnConfig,
    ExtractConfig,
    S3Config,
    SourceConfig,
)
from imgcap.io.outputs import INCOMPLETE_DIR, OutputDirectory
from imgcap.io.sources import SourceError
from imgcap.io.storage import S3Options
from imgcap.testing.fault_harness import (
    FAST_NODE_DEATH,
    armed,
    output_ids,
    remove_node_on_marker,
    run_killed,
    three_node_cluster,
)
from imgcap.testing.fixtures import untrained_bundle
from imgcap.testing.flaky_s3 import FlakyS3Proxy

ROOT = Path(__file__).resolve().parents[1]


def faults(*specs: str):
    """Arm `specs` (``<stage>:<batch>:<marker>[:mode]``) for every Ray worker of the test clusters."""
    return armed(FAULTS_FILE, *specs)


def assert_exactly_once(ids: list[str], expected: set[str]) -> None:
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate row(s)"
    assert set(ids) == expected, f"lost {sorted(expected - set(ids))[:5]}, extra {sorted(set(ids) - expected)[:5]}"


# --- actors and tasks killed mid-job (local cluster)


def test_killed_actors_and_a_failed_read_task_lose_nothing(ray_local, tmp_path):
    images = write_jpegs(tmp_path / "images", 48)
    expected = {p.stem for p in images}
    bundle = untrained_bundle(tmp_path / "bundle")
    markers = {name: tmp_path / f"{name}.marker" for name in ("read", "cnn", "caption", "cnn2", "caption2")}

    # extraction: a read task raises a transient error, a CNN actor dies on its 2nd batch
    with faults(f"read:1:{markers['read']}:raise", f"cnn:2:{markers['cnn']}"):
        extracted = extract_features(ExtractConfig(
            sources=[SourceConfig(str(tmp_path / "images"))], output_dir=str(tmp_path / "features"),
            backbone="thumbnail", weights="none", batch_size=8, shard_size=8, rows_per_file=16))
    assert markers["read"].exists() and markers["cnn"].exists()
    assert (extracted.ok, extracted.failed, extracted.missing) == (48, 0, 0)
    assert_exactly_once(output_ids(str(tmp_path / "features")), expected)
    assert extracted.recovery is not None and sum(extracted.recovery.actor_restarts.values()) >= 1
    assert sum(extracted.recovery.task_retries.values()) >= 1  # the CNN batch of the dead actor (the failed
    # read is read again inside its task: imgcap.batch.reading.shard_rows)
    assert "recovered:" in extracted.format()

    # the caption job over those features: a caption-decoding actor dies on its 2nd batch
    with faults(f"caption:2:{markers['caption']}"):
        from_features = run_caption_job(CaptionJobConfig(
            bundle=bundle, features=str(tmp_path / "features"), output_dir=str(tmp_path / "from_features"),
            batch_size=8, rows_per_file=16))
    assert markers["caption"].exists() and from_features.missing == 0
    assert_exactly_once(output_ids(str(tmp_path / "from_features" / "captions")), expected)
    assert from_features.recovery is not None and sum(from_features.recovery.actor_restarts.values()) >= 1

    # images -> captions: the captioner actor dies in its CNN, then again (restarted) in caption decoding
    with faults(f"cnn:2:{markers['cnn2']}", f"caption:3:{markers['caption2']}"):
        from_images = run_caption_job(CaptionJobConfig(
            bundle=bundle, sources=[SourceConfig(str(tmp_path / "images"))], output_dir=str(tmp_path / "captions"),
            cnn=CnnConfig(weights="none", batch_size=8), shard_size=8, rows_per_file=16))
    assert markers["cnn2"].exists() and markers["caption2"].exists()
    assert (from_images.captioned, from_images.failed, from_images.missing) == (48, 0, 0)
    assert_exactly_once(output_ids(str(tmp_path / "captions" / "captions")), expected)
    assert from_images.recovery is not None and sum(from_images.recovery.actor_restarts.values()) >= 2
    assert "actor restarts" in from_images.format()


# --- S3 failing: transient errors retried, permanent ones named


PHOTOS = 16  # each failed request costs the SDK's backoff: enough photos for every kind of failure, no more


@pytest.fixture()
def photos_bucket(s3_server):
    client = boto3.client("s3", endpoint_url=s3_server)
    bucket = f"flaky-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    client.create_bucket(Bucket=bucket)
    for i in range(PHOTOS):
        client.put_object(Bucket=bucket, Key=f"photos/p{i:03d}.jpg", Body=jpeg_bytes(seed=i))
    return bucket, {f"p{i:03d}" for i in range(PHOTOS)}


def test_transient_s3_errors_are_retried_and_lose_nothing(ray_local, s3_server, photos_bucket):
    bucket, expected = photos_bucket
    proxy = FlakyS3Proxy(s3_server, fail_every=5).start()  # every 5th request: 500, 503 SlowDown, 503
    try:
        config = ExtractConfig(sources=[SourceConfig(f"s3://{bucket}/photos")], output_dir=f"s3://{bucket}/features",
                               backbone="thumbnail", weights="none", batch_size=8, shard_size=8, rows_per_file=8,
                               s3=S3Config(endpoint_url=proxy.url))
        summary = extract_features(config)  # listing, reads and Parquet writes all through the flaky proxy
        assert (summary.ok, summary.failed, summary.missing) == (PHOTOS, 0, 0)
        assert proxy.failed >= 10  # absorbed by the AWS SDK's retries, read task retries and the driver's
    finally:
        proxy.stop()
    assert_exactly_once(output_ids(f"s3://{bucket}/features", S3Options(endpoint_url=s3_server)), expected)


def test_reads_failing_past_the_sdk_retries_are_read_again_in_their_task(ray_local, s3_server, photos_bucket,
                                                                          tmp_path):
    bucket, expected = photos_bucket
    # one attempt per request: a failed GET of a photo is not retried by the SDK, so read_shard raises
    # TransientReadError and the read task reads the shard again (imgcap.batch.reading.shard_rows); no photo
    # may become an error row, none may be written twice
    proxy = FlakyS3Proxy(s3_server, fail_every=7, fail_prefix=f"/{bucket}/photos/").start()
    try:
        summary = extract_features(ExtractConfig(
            sources=[SourceConfig(f"s3://{bucket}/photos")], output_dir=str(tmp_path / "features"),
            backbone="thumbnail", weights="none", batch_size=8, shard_size=2, rows_per_file=8,
            s3=S3Config(endpoint_url=proxy.url, max_attempts=1)))
        assert proxy.failed >= 3
    finally:
        proxy.stop()
    assert (summary.ok, summary.failed, summary.missing) == (PHOTOS, 0, 0)
    assert_exactly_once(output_ids(str(tmp_path / "features")), expected)


class CountingProxy(FlakyS3Proxy):
    """The flaky proxy, counting the requests it answered with 403 AccessDenied."""

    denied = 0

    def _verdict(self, path: str) -> tuple[int, str] | None:
        verdict = super()._verdict(path)
        if verdict is not None and verdict[0] == 403:
            with self._lock:
                self.denied += 1
        return verdict


def test_permanent_s3_errors_fail_fast_naming_the_uri(ray_local, s3_server, photos_bucket, tmp_path):
    bucket, _ = photos_bucket
    proxy = CountingProxy(s3_server, denied_prefix=f"/{bucket}").start()  # 403 AccessDenied for the bucket
    try:
        config = ExtractConfig(sources=[SourceConfig(f"s3://{bucket}/photos")], output_dir=str(tmp_path / "a"),
                               backbone="thumbnail", weights="none", s3=S3Config(endpoint_url=proxy.url))
        with pytest.raises(SourceError, match=f"cannot list s3://{bucket}/photos: .*ACCESS_DENIED"):
            extract_features(config)
        # No retrying of a 403: one retried request alone would have been answered s3.max_attempts times.
        assert 1 <= proxy.denied < config.s3.max_attempts, proxy.denied
    finally:
        proxy.stop()
    with pytest.raises(SourceError, match="cannot list s3://no-such-bucket-imgcap/photos: bucket 'no-such-bucket"):
        extract_features(ExtractConfig(sources=[SourceConfig("s3://no-such-bucket-imgcap/photos")],
                                       output_dir=str(tmp_path / "b"), backbone="thumbnail", weights="none",
                                       s3=S3Config(endpoint_url=s3_server)))
    with pytest.raises(OSError, match="no-such-bucket-imgcap"):
        extract_features(ExtractConfig(sources=[SourceConfig(f"s3://{bucket}/photos")],
                                       output_dir="s3://no-such-bucket-imgcap/features", backbone="thumbnail",
                                       weights="none", s3=S3Config(endpoint_url=s3_server)))


# --- a node removed from a multi-node cluster mid-job


@pytest.fixture(scope="module")
def three_nodes():
    """A head (no CPUs: it only runs the driver) and two 2-CPU worker nodes on this machine; its GCS finds a
    removed node dead in about 3 s instead of Ray's default 15 s (`FAST_NODE_DEATH`). The session's local Ray
    is stopped for the module and started again afterwards."""
    import ray

    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    cluster, workers = three_node_cluster(TEST_WORKER_ENV, FAST_NODE_DEATH)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()
    if was_running:
        start_local_ray()


@pytest.fixture()
def two_worker_nodes(three_nodes):
    """The three-node cluster for a test that removes a worker node; afterwards new nodes bring it back to two
    worker nodes for the next test."""
    cluster, workers = three_nodes
    yield cluster, workers
    while len(workers) < 2:  # remove_node_on_marker drops the removed node from `workers`
        workers.append(cluster.add_node(num_cpus=2, env_vars=TEST_WORKER_ENV))
    cluster.wait_for_nodes()


def test_a_node_removed_mid_job_loses_nothing(two_worker_nodes, tmp_path):
    """images -> captions, the product's job: a worker node removed while its captioner actor holds a batch."""
    cluster, workers = two_worker_nodes
    images = write_jpegs(tmp_path / "images", 96)
    expected = {p.stem for p in images}
    bundle = untrained_bundle(tmp_path / "bundle")
    marker = tmp_path / "caption.marker"
    striker = remove_node_on_marker(cluster, workers, marker)
    with faults(f"caption:2:{marker}:pause"):
        captioned = run_caption_job(CaptionJobConfig(
            bundle=bundle, sources=[SourceConfig(str(tmp_path / "images"))], output_dir=str(tmp_path / "captions"),
            cnn=CnnConfig(weights="none", batch_size=8), shard_size=8, rows_per_file=16))
    striker.join()
    assert (captioned.captioned, captioned.failed, captioned.missing) == (96, 0, 0)
    assert_exactly_once(output_ids(str(tmp_path / "captions" / "captions")), expected)
    assert captioned.recovery is not None and captioned.recovery.nodes_lost == 1
    assert "nodes lost 1" in captioned.format()


@pytest.mark.slow  # ~30 s; the same recovery as the images -> captions job above, in the extraction job
def test_a_node_removed_mid_extraction_loses_nothing(two_worker_nodes, tmp_path):
    cluster, workers = two_worker_nodes
    images = write_jpegs(tmp_path / "images", 96)
    expected = {p.stem for p in images}
    marker = tmp_path / "extract.marker"
    striker = remove_node_on_marker(cluster, workers, marker)
    with faults(f"cnn:2:{marker}:pause"):  # the CNN actor holds its 2nd batch while its node is removed
        extracted = extract_features(ExtractConfig(
            sources=[SourceConfig(str(tmp_path / "images"))], output_dir=str(tmp_path / "features"),
            backbone="thumbnail", weights="none", batch_size=8, shard_size=8, rows_per_file=16))
    striker.join()
    assert (extracted.ok, extracted.failed, extracted.missing) == (96, 0, 0)
    assert_exactly_once(output_ids(str(tmp_path / "features")), expected)
    assert extracted.recovery is not None and extracted.recovery.nodes_lost == 1, extracted.format()


# --- drivers SIGKILLed, the same command rerun


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under `root` outside `skip`."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and skip not in p.parents}


def driver_env(address: str) -> dict[str, str]:
    return {**os.environ, **TEST_WORKER_ENV, "RAY_ADDRESS": address, "PYTHONPATH": str(ROOT)}


@pytest.mark.subprocess
def test_killed_caption_job_driver_rerun_ends_complete(ray_local, tmp_path):
    images = write_jpegs(tmp_path / "images", 160)
    expected = {p.stem for p in images}
    bundle = untrained_bundle(tmp_path / "bundle")
    output = tmp_path / "out"
    config = tmp_path / "caption.toml"
    config.write_text(f'bundle = "{bundle}"\noutput_dir = "{output}"\nshard_size = 8\nrows_per_file = 8\n'
                      f'[[sources]]\npath = "{tmp_path / "images"}"\n[cnn]\nweights = "none"\nbatch_size = 8\n',
                      encoding="utf-8")
    before = snapshot(tmp_path, output)
    command = [sys.executable, "jobs/caption.py", "--config", str(config)]
    env = driver_env(ray_local.get_runtime_context().gcs_address)
    captions = OutputDirectory(str(output / "captions"), S3Options())

    # killed after its first file and half-way (files of 8 rows: 20 when complete)
    for ready in (lambda: len(captions.files()) >= 1, lambda: len(captions.files()) >= 10):
        run_killed(command, env, ROOT, ready)
        time.sleep(1)  # Ray reaps the dead driver's workers
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WARNING" not in done.stdout
    assert_exactly_once(output_ids(str(output / "captions")), expected)
    assert (output / "report.html").is_file()
    assert snapshot(tmp_path, output) == before  # nothing outside the output was touched
    for path in (output / "captions" / INCOMPLETE_DIR).glob("*"):  # set aside, not read
        assert path.suffix == ".parquet"


@pytest.mark.slow  # ~2 min; a worker crashing mid-epoch is in the default suite (tests/test_ray_train.py)
@pytest.mark.subprocess
def test_killed_training_driver_rerun_resumes_the_run(ray_local, tmp_path):
    (tmp_path / "data").mkdir()
    files = write_toy_job_files(tmp_path / "data")
    output = tmp_path / "train_out"
    config = tmp_path / "train.toml"
    data = "\n".join(f'{k} = "{v}"' for k, v in files.items())
    config.write_text(f'output_dir = "{output}"\n[data]\n{data}\n[model]\nembedding_dim = 32\nunits = 32\n'
                      f'[train]\nepochs = 4\nbatch_size = 32\npatience = 0\n[ray]\nnum_workers = 2\n',
                      encoding="utf-8")
    command = [sys.executable, "jobs/train.py", "--config", str(config)]
    env = driver_env(ray_local.get_runtime_context().gcs_address)
    run_killed(command, env, ROOT, lambda: any((output / "ray_results").rglob("checkpoint_epoch_0002/state.index")))
    time.sleep(1)
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "continued the existing run from:" in done.stdout and "checkpoint_epoch_000" in done.stdout
    assert "4 epoch(s)" in done.stdout and (output / "bundle" / "bundle.json").is_file()
