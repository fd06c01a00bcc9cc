"""One way to attach to Ray, and what the cluster can become.

`init_ray` is the only place imgcap starts or attaches to Ray; library functions call it (never a bare
``ray.init()``) so the same code runs under ``ray job submit`` (``RAY_ADDRESS`` set by the job server), on a
cluster node, or on a laptop, where it starts a local Ray. `cluster_can_grow` and `max_cluster_resources`
tell whether an autoscaler can still add nodes, and how far. Ray is imported inside the functions on purpose:
importing this module starts nothing.
"""

from __future__ import annotations

import json
import logging
import os

from imgcap.runtime.logs import quiet_tensorflow

log = logging.getLogger(__name__)


def init_ray() -> None:
    """Attach to the cluster of ``ray job submit`` / ``RAY_ADDRESS``, or start a local Ray; no-op if attached.

    A local Ray started here inherits this process's environment (so the quiet TensorFlow settings reach
    its workers); on a cluster the actors quiet TensorFlow themselves before importing it.
    """
    import ray

    if ray.is_initialized():
        return
    quiet_tensorflow()
    # Without a terminal Ray Data logs its whole progress table every 10 s: once a minute says as much on a
    # long job (read when ray.data is first imported, which the jobs do after this; a user's value wins).
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "60")
    # Workers' and actors' output goes to Ray's log files, not the job's console: the jobs print their own
    # progress (Ray Data's progress, one line per training epoch) and summary, and errors reach the driver
    # as exceptions with the remote traceback.
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)


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


def max_cluster_resources() -> dict[str, float] | None:
    """The fully scaled-up cluster's resources from the GCS cluster config an autoscaler published (the
    same source `cluster_can_grow` reads first), or None when none was published."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:
        return None
