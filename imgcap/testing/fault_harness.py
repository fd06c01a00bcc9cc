"""What the fault tests and ``benchmarks/faults.py`` both do around a job: arm a fault, start a three-node
cluster and strike the node a paused stage names, kill a driver at a chosen moment, and read back every image
id an output holds.

Ray is imported inside the cluster helper on purpose: the other helpers need none of it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from imgcap.io.outputs import OutputDirectory
from imgcap.io.storage import S3Options
from imgcap.testing.fixtures import free_ports


@contextmanager
def armed(faults_file: Path, *specs: str) -> Iterator[None]:
    """Arm `specs` (``<stage>:<batch>:<marker>[:mode]``, imgcap.runtime.fault_injection) for every Ray worker that reads
    `faults_file`, for the duration of the block."""
    faults_file.write_text("\n".join(specs) + "\n", encoding="utf-8")
    try:
        yield
    finally:
        faults_file.unlink(missing_ok=True)


def output_ids(uri: str, s3: S3Options = S3Options()) -> list[str]:
    """Every image id written to a Parquet output directory, duplicates included (so they can be counted)."""
    output = OutputDirectory(uri, s3)
    return [i for path in output.files()
            for i in pq.read_table(path, columns=["image_id"], filesystem=output.filesystem)["image_id"].to_pylist()]


def three_node_cluster(env: dict[str, str], system_config: dict[str, Any] | None = None) -> tuple[Any, list]:
    """A head with no CPUs (it only runs the driver) and two 2-CPU worker nodes on this machine, every worker
    with `env`, and this process connected to it as the driver; `system_config` is the head's Ray
    ``_system_config`` (e.g. `FAST_NODE_DEATH`). Returns (the cluster, its worker nodes).

    The head's dashboard (the state API that jobs read what Ray recovered from, `RecoveryWatch`) gets a free
    port of its own: `Cluster` asks for 8265 alone, and where another Ray on the machine holds that port it
    starts no dashboard at all, silently, and every job's recovery report is None."""
    import ray
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 0, "env_vars": env, "include_dashboard": True, "dashboard_port": free_ports()[0],
            **({"_system_config": system_config} if system_config else {})}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(num_cpus=2, env_vars=env) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
    return cluster, workers


# Ray's GCS declares a node dead after `health_check_failure_threshold` failed health checks
# `health_check_period_ms` apart (defaults 5 x 3 s: 15 s). A raylet removed without grace refuses the checks at
# once, so these settings let the GCS find it dead in about 3 s instead; a live but busy raylet still fails a
# check only by not answering within `health_check_timeout_ms` (left at Ray's default), three times in a row.
# For the tests, where that wait was half of the node-loss test's time; the benchmarks keep Ray's defaults.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def remove_node_on_marker(cluster, workers: list, marker: Path, timeout_s: float = 120) -> threading.Thread:
    """Remove (without grace) the worker node of `cluster` named in `marker` as soon as a ``pause`` fault writes
    it, and drop it from `workers`. Returns the started thread (join it after the job)."""
    def strike() -> None:
        deadline = time.monotonic() + timeout_s
        while not marker.exists() or not marker.read_text():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        node_id = json.loads(marker.read_text())["node_id"]
        victim = next(w for w in workers if w.node_id == node_id)
        cluster.remove_node(victim, allow_graceful=False)
        workers.remove(victim)

    thread = threading.Thread(target=strike, daemon=True)
    thread.start()
    return thread


def run_killed(command: list[str], env: dict[str, str], cwd: Path, ready: Callable[[], bool],
               timeout_s: float = 300) -> float:
    """Start `command`, SIGKILL it as soon as `ready()` holds (or it exits); the seconds it ran."""
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not ready() and time.monotonic() - started < timeout_s:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return time.monotonic() - started
