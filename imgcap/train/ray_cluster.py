"""Enough CPUs and GPUs for the Ray Train workers, or an autoscaler to deliver them.

Ray is imported inside the functions on purpose: a config is checked without loading it.
"""

from __future__ import annotations

import logging
import math
import time
import uuid

from imgcap.config.loader import ConfigError
from imgcap.config.training import TrainJobConfig
from imgcap.runtime.cluster import cluster_can_grow, max_cluster_resources

log = logging.getLogger(__name__)


def worker_bundle(config: TrainJobConfig) -> dict[str, float]:
    return {"CPU": config.ray.cpus_per_worker, **({"GPU": 1} if config.ray.use_gpu else {})}


def _cluster_shortfall(config: TrainJobConfig, resources: dict[str, float]) -> str | None:
    """What the workers need that `resources` (CPU/GPU totals) lack, as a `ConfigError` message, or None."""
    ray_config = config.ray
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    needed = ray_config.num_workers * ray_config.cpus_per_worker
    if needed > cpus:
        most = int(cpus // ray_config.cpus_per_worker)
        return (f"ray.num_workers = {ray_config.num_workers} with ray.cpus_per_worker = "
                f"{ray_config.cpus_per_worker} needs {needed} CPUs but the Ray cluster has {cpus:g}; "
                f"set ray.num_workers <= {most} (or lower ray.cpus_per_worker, or add nodes)")
    if ray_config.use_gpu and gpus < ray_config.num_workers:
        return (f"ray.use_gpu = true needs one GPU per worker ({ray_config.num_workers}) but the Ray "
                f"cluster has {gpus:g}; set ray.use_gpu = false or ray.num_workers <= {int(gpus)}")
    return None


def check_cluster(config: TrainJobConfig, wait: bool = True) -> None:
    """Enough CPUs/GPUs for ``ray.num_workers`` workers, or an autoscaler to add them.

    A fixed cluster that lacks them is refused at once. On a cluster that can grow (`imgcap.runtime.cluster.cluster_can_grow`) a
    warning says what is missing and, with `wait`, this waits up to ``ray.resource_timeout_s`` for the
    autoscaler (0: refuse at once); `validate_job` first calls it with ``wait=False`` (refuse a fixed cluster
    before reading the data) and waits last, once everything else is known to be valid.
    """
    import ray

    missing = _cluster_shortfall(config, ray.cluster_resources())
    if missing is None:
        return
    timeout = config.ray.resource_timeout_s
    if not timeout or not cluster_can_grow():
        raise ConfigError(missing)
    most = max_cluster_resources()
    if most:
        beyond = _cluster_shortfall(config, most)
        if beyond is not None:
            at_most = "even fully scaled up (the autoscaler's cluster config) the Ray cluster has at most"
            raise ConfigError(beyond.replace("the Ray cluster has", at_most))
    if wait:
        _wait_for_cluster(config, missing)


def _wait_for_cluster(config: TrainJobConfig, missing: str) -> None:
    """Wait up to ``ray.resource_timeout_s`` until the workers' bundles can be placed.

    A placement group of the same bundles Ray Train will ask for is the demand the autoscaler scales up for
    (``ray.autoscaler.sdk.request_resources`` would replace every other job's request on the cluster); it is
    removed as soon as it is ready (or at the timeout), and Ray Train then places its own.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    timeout = config.ray.resource_timeout_s
    log.warning("%s -- an autoscaler can add nodes, so Ray Train will wait for the autoscaler: waiting up to "
                "%g s (ray.resource_timeout_s) for %d worker(s) of %s", missing, timeout, config.ray.num_workers,
                worker_bundle(config))
    started = time.monotonic()
    group = placement_group([worker_bundle(config)] * config.ray.num_workers, strategy="PACK",
                            name=f"imgcap-wait-{uuid.uuid4().hex[:8]}")
    try:
        while (left := timeout - (time.monotonic() - started)) > 0:
            if group.wait(math.ceil(min(left, 60.0))):  # whole seconds: the core worker truncates a float
                log.info("the Ray cluster has the workers' resources after %.0f s: %s",
                         time.monotonic() - started, ray.cluster_resources())
                return
            log.info("still waiting for the autoscaler (%.0f of %g s): the cluster has %s",
                     time.monotonic() - started, timeout, ray.cluster_resources())
    finally:
        remove_placement_group(group)
    now = _cluster_shortfall(config, ray.cluster_resources()) or missing
    raise ConfigError(f"waited {timeout:g} s (ray.resource_timeout_s) for the autoscaler, in vain: {now}; or raise "
                      f"ray.resource_timeout_s if the cluster is still scaling up")
