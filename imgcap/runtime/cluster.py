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
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


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
