"""Process set-up shared by every job: quiet TensorFlow logs and one way to attach to Ray.

`quiet_tensorflow` must run before TensorFlow is first imported: TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL``
once, at import. The job scripts in ``jobs/`` call it before they import anything of imgcap. Since 2.19
TensorFlow logs its CUDA / oneDNN start-up banners through absl, which ignores that variable, so
`import_tensorflow` imports it with those lines filtered out of stderr; imgcap's drivers, Ray actors and train
workers import TensorFlow through it, so a CPU machine prints no CUDA banner. An already-set variable is
left to the user (``TF_CPP_MIN_LOG_LEVEL=0``).

`init_ray` is the only place imgcap starts or attaches to Ray; library functions call it (never a bare
``ray.init()``) so the same code runs under ``ray job submit`` (``RAY_ADDRESS`` set by the job server), on a
cluster node, or on a laptop, where it starts a local Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgcap.config import ActorPoolConfig

log = logging.getLogger(__name__)

# Environment variables TensorFlow reads at import time, and what keeps them quiet on a CPU machine:
# 2 hides INFO and WARNING lines of TensorFlow's C++ side (CUDA probing, oneDNN notices, cpu feature guards).
QUIET_TF_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}


def quiet_tensorflow() -> None:
    """Keep TensorFlow's import-time C++ banners out of job logs (a no-op for variables already set)."""
    for key, value in QUIET_TF_ENV.items():
        os.environ.setdefault(key, value)


# What TensorFlow prints on a machine without a GPU when it is first imported and first asked for devices.
# Since 2.19 it logs these through absl, which ignores TF_CPP_MIN_LOG_LEVEL (tensorflow/tensorflow#100442), so
# they are filtered out of stderr around the import instead; every other line still reaches stderr.
_TF_CPU_BANNERS = ("Could not find cuda drivers", "oneDNN custom operations are on", "absl::InitializeLog()",
                   "failed call to cuInit", "To enable the following instructions",
                   "rebuild TensorFlow with the appropriate compiler flags", "Unable to register cu")


@contextlib.contextmanager
def _stderr_without(banners: tuple[str, ...]) -> Iterator[None]:
    """Capture file descriptor 2 (C++ writes there, not to sys.stderr) and re-emit it minus lines that hold
    one of `banners`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", errors="replace").splitlines(keepends=True):
                if not any(banner in line for banner in banners):
                    sys.stderr.write(line)
            sys.stderr.flush()


def import_tensorflow() -> Any:
    """TensorFlow, imported (the first time in this process) without its CPU-machine start-up banners.

    Called where imgcap first needs TensorFlow in a process (the jobs' drivers, the Ray actors and train
    workers), before any module that imports it at top level.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    quiet_tensorflow()
    with _stderr_without(_TF_CPU_BANNERS):
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the CUDA probe logs on the first device query
    return tf


def setup_logging() -> None:
    """Job logging: INFO for imgcap, quiet TensorFlow (see `quiet_tensorflow`)."""
    quiet_tensorflow()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def init_ray() -> None:
    """Attach to the cluster of ``ray job submit`` / ``RAY_ADDRESS``, or start a local Ray; no-op if attached.

    A local Ray started here inherits this process's environment (so the quiet TensorFlow settings reach
    its workers); on a cluster the actors quiet TensorFlow themselves before importing it.
    """
    import ray

    if ray.is_initialized():
        return
    quiet_tensorflow()
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def actor_pool_args(pool: "ActorPoolConfig") -> dict[str, Any]:
    """`map_batches` arguments of a Ray Data actor pool (CNN or caption actors): autoscaling between
    `actors` and `max_actors`, and the CPUs and GPUs each actor asks for.

    GPUs are requested whenever `gpus_per_actor` > 0, even if the cluster has none yet: an autoscaling cluster
    whose GPU workers start at zero adds a GPU node only when something asks for a GPU.
    """
    import ray.data

    compute = ray.data.ActorPoolStrategy(min_size=pool.actors, max_size=max(pool.actors, pool.max_actors))
    # Ray Data's defaults today, stated so a change of them cannot silently drop work: an actor that dies
    # (OOM kill, lost node, crash) is restarted without limit, and the batches it held are resubmitted to the
    # pool without limit; each batch's rows reach the writer once (tests/test_faults.py).
    args: dict[str, Any] = {"compute": compute, "num_cpus": pool.cpus_per_actor,
                            "max_restarts": -1, "max_task_retries": -1}
    if pool.gpus_per_actor > 0:
        args["num_gpus"] = pool.gpus_per_actor
    return args


def _autoscaler_node_types() -> tuple[dict[str, str], bool]:
    """({node id or IP: node type} of the autoscaler's status, pending launches?), as ``ray status`` reads it:
    autoscaler v2's cluster status, or the JSON the v1 monitor keeps in the GCS KV."""
    import ray
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        nodes = status.active_nodes + status.idle_nodes + status.pending_nodes
        types = {n.node_id or n.instance_id: n.ray_node_type_name for n in nodes if n.ray_node_type_name}
        return types, bool(status.pending_launches or status.pending_nodes)
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    return dict(report.get("node_type_mapping") or {}), bool(report.get("pending_launches")
                                                             or report.get("pending_nodes"))


def cluster_can_grow() -> bool:
    """Whether an autoscaler can still add nodes to the Ray cluster (Ray must be initialised).

    The GCS cluster config when an autoscaler published one (a node group whose count can rise); else the
    autoscaler's status: node types that are not the read-only provider's ``node_<node id>`` (which every
    cluster without an autoscaling config runs), or pending launches. Unknown (no status yet): False.
    """
    try:
        from ray._private.state import state
        from ray.autoscaler._private.util import format_readonly_node_type

        config = state.get_cluster_config()
        if config is not None and config.node_group_configs:
            return any(group.max_count == -1 or group.max_count > group.min_count
                       for group in config.node_group_configs if group.resources and group.max_count != 0)
        types, pending = _autoscaler_node_types()
    except Exception as exc:  # an autoscaler API that moved: treat the cluster as fixed (refuse, as before)
        log.warning("could not tell whether an autoscaler runs (%s); treating the Ray cluster as fixed", exc)
        return False
    return pending or any(name != format_readonly_node_type(node) for node, name in types.items())


def check_gpus_schedulable(pool: "ActorPoolConfig", key: str) -> None:
    """Refuse GPU actors that could never start: `gpus_per_actor` > 0 on a Ray cluster that has too few GPUs
    and no autoscaler to add any (Ray Data would wait for them forever). An autoscaling cluster is left to
    grow (that request is what makes it add GPU nodes); `key` names the config key in the message."""
    import ray

    from imgcap.config import ConfigError

    if pool.gpus_per_actor <= 0 or ray.cluster_resources().get("GPU", 0.0) >= pool.gpus_per_actor:
        return
    if cluster_can_grow():
        log.info("%s = %g: waiting for the autoscaler to add GPU nodes", key, pool.gpus_per_actor)
        return
    raise ConfigError(f"{key} = {pool.gpus_per_actor:g} but this Ray cluster has no GPU for it and no autoscaler "
                      f"to add one: set {key} = 0 to run on CPU, or run on a cluster with GPU nodes")


@dataclass(frozen=True)
class Recovery:
    """What Ray recovered from while a job ran, as its state API recorded it."""

    actor_restarts: dict[str, int]  # actor class -> restarts (a dead actor brought back with its state lost)
    task_retries: dict[str, int]  # task or actor method -> failed attempts that were run again
    nodes_lost: int  # nodes that died while the job ran

    def format(self) -> str:
        """One line for a job's summary."""
        def counts(found: dict[str, int]) -> str:
            return ", ".join(f"{name} x{n}" for name, n in sorted(found.items())) or "none"

        return (f"recovered: nodes lost {self.nodes_lost}; actor restarts: {counts(self.actor_restarts)}; "
                f"task attempts retried: {counts(self.task_retries)}")

    @property
    def anything(self) -> bool:
        return bool(self.nodes_lost or self.actor_restarts or self.task_retries)


class RecoveryWatch:
    """Counts the actor restarts, task retries and lost nodes of Ray's recovery from the moment it is made (Ray
    must be initialised). Ray retries silently; this is how a job's summary can say what it retried. Ray's state
    API counts per Ray job, i.e. per driver, so what a driver recovered before (an earlier job in the same
    process) is taken as a baseline and left out. Reads the state API of the Ray dashboard: without one
    (``include_dashboard=False``) `report` is None."""

    def __init__(self) -> None:
        import ray

        context = ray.get_runtime_context()
        self.job_id = context.get_job_id()
        # this driver's cluster, named: left to itself the state API refuses to choose when a machine runs two
        self.address = context.gcs_address
        self.before = self._tally()

    def _tally(self) -> Recovery | None:
        """Everything recovered so far: lost nodes of the cluster, restarts and retries of this driver's job."""
        from ray.util.state import list_actors, list_nodes, list_tasks

        job = [("job_id", "=", self.job_id)]
        try:
            dead = list_nodes(address=self.address, filters=[("state", "=", "DEAD")], limit=10_000,
                              raise_on_missing_output=False)
            actors = list_actors(address=self.address, filters=job, detail=True, limit=10_000,
                                 raise_on_missing_output=False)
            failed = list_tasks(address=self.address, filters=[*job, ("state", "=", "FAILED")], limit=10_000,
                                raise_on_missing_output=False)
        except Exception as exc:  # no dashboard, or a state API that moved: the summary says less, nothing fails
            log.debug("Ray state API unavailable: %s", exc)
            return None
        restarts: Counter[str] = Counter()
        for actor in actors:
            restarts[actor.class_name] += int(actor.num_restarts or 0)
        # a failed attempt of a job that went on to finish was retried
        retries = Counter(task.name for task in failed if task.error_type != "TASK_CANCELLED")
        return Recovery(dict(restarts), dict(retries), len(dead))

    def report(self) -> Recovery | None:
        """What was recovered since this watch was made, or None when Ray's state API cannot say."""
        now = self._tally()
        if now is None or self.before is None:
            return None
        restarts = Counter(now.actor_restarts) - Counter(self.before.actor_restarts)  # drops the zeros
        retries = Counter(now.task_retries) - Counter(self.before.task_retries)
        return Recovery(dict(restarts), dict(retries), now.nodes_lost - self.before.nodes_lost)
