"""GPU code paths, checked for what they request and refuse (no GPU on this machine; see README "Limits")."""

from __future__ import annotations

import pytest
import ray.data
from _imaging import write_jpegs
from conftest import nothing_started_on

from imgcap.batch.actors import actor_pool_args, check_gpus_schedulable
from imgcap.config.jobs import ActorPoolConfig, ExtractConfig
from imgcap.config.loader import ConfigError, config_from_dict
from imgcap.vision.embedder import check_gpus_visible


def test_actor_pools_request_gpus_whenever_asked_and_autoscale_between_min_and_max():
    gpu = actor_pool_args(ActorPoolConfig(actors=1, max_actors=4, cpus_per_actor=2, gpus_per_actor=1))
    assert gpu["num_gpus"] == 1 and gpu["num_cpus"] == 2  # asked for even while the cluster has no GPU node
    assert isinstance(gpu["compute"], ray.data.ActorPoolStrategy)
    assert (gpu["compute"].min_size, gpu["compute"].max_size) == (1, 4)
    cpu = actor_pool_args(ActorPoolConfig(actors=2))
    assert "num_gpus" not in cpu and (cpu["compute"].min_size, cpu["compute"].max_size) == (2, 2)


def test_a_gpu_tensorflow_cannot_see_fails_loudly():
    with pytest.raises(RuntimeError, match=r"assigned GPU\(s\) \['0'\].*TensorFlow sees no GPU.*tensorflow\[and-cuda\]"):
        check_gpus_visible(["0"], [])
    check_gpus_visible(["0"], ["PhysicalDevice(name='/physical_device:GPU:0')"])  # visible: fine
    check_gpus_visible([], [])  # a CPU actor: fine


def test_gpu_actors_on_a_fixed_cpu_cluster_are_refused_naming_the_key(ray_local, tmp_path):
    from imgcap.batch.extract import extract_features

    check_gpus_schedulable(ActorPoolConfig(gpus_per_actor=0))  # CPU: nothing to check
    write_jpegs(tmp_path / "images", 2)
    config = config_from_dict(ExtractConfig, {"sources": [{"path": str(tmp_path / "images")}], "backbone": "thumbnail",
                                              "output_dir": str(tmp_path / "out"), "gpus_per_actor": 1})
    # Refused before Ray Data started anything (no CNN actor waiting forever for a GPU that cannot come),
    # and before any feature was written.
    with nothing_started_on(ray_local), pytest.raises(
            ConfigError, match="gpus_per_actor = 1 but this Ray cluster has no GPU .* set gpus_per_actor = 0"):
        extract_features(config)
    assert not list((tmp_path / "out").glob("*.parquet"))
