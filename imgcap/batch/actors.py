"""The Ray Data actor pools of the jobs (CNN actors, caption actors): what each actor asks of the cluster,
and a refusal of GPU actors that could never start. Ray is imported inside the functions on purpose, so a
config can be checked without starting it."""

from __future__ import annotations

import logging
from typing import Any

from imgcap.config.jobs import ActorPoolConfig
from imgcap.config.loader import ConfigError
from imgcap.runtime.cluster import cluster_can_grow

log = logging.getLogger(__name__)


def actor_pool_args(pool: ActorPoolConfig) -> dict[str, Any]:
    """`map_batches` arguments of an actor pool: autoscaling between `actors` and `max_actors`, and the CPUs
    and GPUs each actor asks for.

    GPUs are requested whenever `gpus_per_actor` > 0, even if the cluster has none yet: an autoscaling cluster
    whose GPU workers start at zero adds a GPU node only when something asks for a GPU. An actor that dies
    (OOM kill, lost node, crash) is restarted and its batches resubmitted without limit: Ray Data's own
    defaults for actor pools, on which every batch reaching the writer once rests (tests/test_faults.py).
    """
    import ray.data

    compute = ray.data.ActorPoolStrategy(min_size=pool.actors, max_size=max(pool.actors, pool.max_actors))
    args: dict[str, Any] = {"compute": compute, "num_cpus": pool.cpus_per_actor}
    if pool.gpus_per_actor > 0:
        args["num_gpus"] = pool.gpus_per_actor
    return args


def check_gpus_schedulable(pool: ActorPoolConfig, table: str = "") -> None:
    """Refuse GPU actors that could never start: `gpus_per_actor` > 0 on a Ray cluster that has too few GPUs
    and no autoscaler to add any (Ray Data would wait for them forever). An autoscaling cluster is left to
    grow (that request is what makes it add GPU nodes). `table` is the config table holding the pool's keys
    ("cnn" for ``cnn.gpus_per_actor``; "" for a top-level key), for the message."""
    import ray

    key = f"{table}.gpus_per_actor" if table else "gpus_per_actor"
    if pool.gpus_per_actor <= 0 or ray.cluster_resources().get("GPU", 0.0) >= pool.gpus_per_actor:
        return
    if cluster_can_grow():
        log.info("%s = %g: waiting for the autoscaler to add GPU nodes", key, pool.gpus_per_actor)
        return
    raise ConfigError(f"{key} = {pool.gpus_per_actor:g} but this Ray cluster has no GPU for it and no autoscaler "
                      f"to add one: set {key} = 0 to run on CPU, or run on a cluster with GPU nodes")
