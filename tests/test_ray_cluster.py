"""Resources for the Ray Train workers (imgcap/train/ray_cluster.py) on the local 2-CPU Ray cluster: a fixed
cluster that lacks them is refused at once, an autoscaling one is waited for (up to ray.resource_timeout_s).
No Ray Train run is started."""

from __future__ import annotations

import dataclasses
import importlib
import threading
import time

import pytest

from imgcap.config.loader import ConfigError, config_from_dict
from imgcap.config.training import TrainJobConfig
from imgcap.train import ray_cluster


def job_config(**tables) -> TrainJobConfig:
    """A training job config; check_cluster reads only its [ray] table (and [train] must fit it)."""
    return config_from_dict(TrainJobConfig, {"data": {"captions": "c", "features": "f"}, **tables})


@pytest.fixture()
def placement_groups(monkeypatch) -> list:
    """Every placement group check_cluster creates, as (bundles, group), in order; created for real."""
    pg_module = importlib.import_module("ray.util.placement_group")  # the module (ray.util's name is the function)
    groups, create = [], pg_module.placement_group

    def recording(bundles, **kwargs):
        groups.append((bundles, create(bundles, **kwargs)))
        return groups[-1][1]

    monkeypatch.setattr(pg_module, "placement_group", recording)
    return groups


def test_fixed_cluster_is_refused_at_once(ray_local, placement_groups):
    assert ray_cluster.cluster_can_grow() is False  # a local ray.init(): the read-only autoscaler
    config = job_config(ray={"use_gpu": True, "num_workers": 1})
    assert config.ray.resource_timeout_s == 900
    with pytest.raises(ConfigError, match=r"ray.use_gpu = true needs one GPU per worker \(1\) but the Ray cluster "
                                          r"has 0; set ray.use_gpu = false"):
        ray_cluster.check_cluster(config)
    assert not placement_groups  # refused without waiting: no demand was put to the cluster


def test_autoscaling_cluster_is_waited_for(ray_local, placement_groups, monkeypatch):
    """The autoscaler predicate is forced; the waiting is real: a placement group of the workers' bundles on
    the local cluster, which never fits (3 CPUs on 2), or fits once an actor holding every CPU is killed."""
    monkeypatch.setattr(ray_cluster, "cluster_can_grow", lambda: True)
    cpus = int(ray_local.cluster_resources()["CPU"])
    config = job_config(train={"batch_size": 8 * (cpus + 1)},
                        ray={"num_workers": cpus + 1, "resource_timeout_s": 4})
    ray_cluster.check_cluster(config, wait=False)  # can grow: not refused before the data are read
    assert not placement_groups
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"waited 4 s \(ray.resource_timeout_s\) for the autoscaler, in vain: "
                                          rf"ray.num_workers = {cpus + 1} .* needs {cpus + 1} CPUs .* set "
                                          rf"ray.num_workers <= {cpus} .* raise ray.resource_timeout_s"):
        ray_cluster.check_cluster(config)
    assert time.perf_counter() - started >= 4  # it did wait the whole timeout
    assert len(placement_groups) == 1  # one demand, put once
    assert placement_groups[0][0] == [{"CPU": 1}] * (cpus + 1)  # the demand the autoscaler scales up for
    assert ray_local.util.placement_group_table(placement_groups[0][1])["state"] == "REMOVED"

    no_wait = dataclasses.replace(config, ray=dataclasses.replace(config.ray, resource_timeout_s=0))
    with pytest.raises(ConfigError, match=f"needs {cpus + 1} CPUs but the Ray cluster has {cpus}"):
        ray_cluster.check_cluster(no_wait)
    assert len(placement_groups) == 1  # refused at once: no new demand, no waiting

    # Resources that come while waiting: the cluster "has" no CPU yet (as seen by the check), and the real
    # CPUs are busy with an actor that goes away after 2 s: the wait ends then, well before its 60 s timeout
    # (at which it would raise "waited 60 s ... in vain").
    @ray_local.remote(num_cpus=cpus)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray_local.get(holder.ready.remote())
    fits = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=8 * cpus),
                               ray=dataclasses.replace(config.ray, num_workers=cpus, resource_timeout_s=60))
    real, calls = ray_local.cluster_resources, []

    def first_look_finds_no_cpu() -> dict:
        calls.append(1)
        return {"CPU": 0.0} if len(calls) == 1 else real()

    monkeypatch.setattr(ray_local, "cluster_resources", first_look_finds_no_cpu)
    threading.Timer(2.0, ray_local.kill, [holder]).start()
    started = time.perf_counter()
    ray_cluster.check_cluster(fits)  # returns: the group was placed before the timeout
    assert time.perf_counter() - started >= 1.5  # it waited for the holder to go
    assert len(placement_groups) == 2
    assert ray_local.util.placement_group_table(placement_groups[-1][1])["state"] == "REMOVED"
