"""The cluster files (cluster/*.yaml, cluster/README.md) against the repository and what the jobs rely on:
the jobs and configs they name exist, GPU worker groups can be scaled up from zero for a GPU request, GPU nodes
get tensorflow[and-cuda] at the pinned TensorFlow version, token auth is on, and the KubeRay RayJob has the
fields the operator needs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAML_FILES = sorted(CLUSTER.glob("*.yaml"))

JOB_RE = re.compile(r"\bjobs/[\w.-]+\.py\b")
CONFIG_RE = re.compile(r"--config[ =]+(\S+\.toml)\b")


def pinned(package: str) -> str:
    """The version pyproject.toml pins `package` to."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    versions = [d.split("==", 1)[1] for d in dependencies if re.fullmatch(rf"{package}(\[[\w,-]+\])?==\S+", d)]
    assert len(versions) == 1, f"pyproject.toml pins {package} {len(versions)} times: {dependencies}"
    return versions[0]


def load(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: expected YAML mappings"
    return docs


def is_launcher(docs: list[dict]) -> bool:
    return len(docs) == 1 and "available_node_types" in docs[0]


def rayjobs(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d.get("kind") == "RayJob"]


def job_commands(text: str) -> list[tuple[str, str | None]]:
    """(job script, its --config or None) of every job command line in `text` (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*#?\s*", " ", text)
    found = []
    for line in joined.splitlines():
        for match in JOB_RE.finditer(line):
            config = CONFIG_RE.search(line, match.end())
            found.append((match.group(0), config.group(1) if config else None))
    return found


def test_the_cluster_directory_holds_a_launcher_config_and_a_rayjob():
    kinds = {path.name: ("launcher" if is_launcher(load(path)) else "rayjob" if rayjobs(load(path)) else "?")
             for path in YAML_FILES}
    assert kinds == {"aws-gpu.yaml": "launcher", "kuberay-rayjob.yaml": "rayjob"}


def test_job_commands_name_jobs_and_configs_that_exist():
    """Every `jobs/*.py` and `--config *.toml` in the cluster files (values and comments) and the README exists,
    and each cluster file shows the main job, jobs/caption.py with configs/caption_s3_example.toml."""
    missing, seen = [], {}
    for path in [*YAML_FILES, CLUSTER / "README.md"]:
        commands = job_commands(path.read_text())
        seen[path.name] = commands
        for job, config in commands:
            for name in (job, config):
                if name is not None and not (ROOT / name).is_file():
                    missing.append(f"{path.name}: {name}")
    assert not missing, f"named but not in the repository: {missing}"
    for path in YAML_FILES:  # each file shows how to run the main job
        assert ("jobs/caption.py", "configs/caption_s3_example.toml") in seen[path.name], path.name


# --- cluster launcher (aws-gpu.yaml)


@pytest.fixture(scope="module")
def launcher() -> dict:
    [config] = load(CLUSTER / "aws-gpu.yaml")
    return config


def gpu_types(config: dict) -> dict[str, dict]:
    return {name: t for name, t in config["available_node_types"].items() if t.get("resources", {}).get("GPU", 0) >= 1}


def test_launcher_config_passes_rays_schema(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher))


def test_launcher_gpu_workers_declare_gpus_and_scale_from_zero(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU") == 0 and head["resources"].get("CPU", 0) >= 1, head["resources"]
    gpu = gpu_types(launcher)
    assert gpu, "no worker type declares resources {'GPU': >= 1}: the autoscaler would never launch one"
    for name, node_type in gpu.items():
        assert node_type["resources"].get("CPU", 0) >= 1, name
        assert node_type.get("min_workers") == 0, f"{name}: GPU workers should start at zero"
        assert node_type.get("max_workers", 0) >= 1, name


def test_launcher_gpu_nodes_install_the_project_with_tensorflow_and_cuda(launcher):
    tf = pinned("tensorflow")
    mounts = launcher["file_mounts"]
    checkout = next(remote for remote, local in mounts.items() if local == ".")
    for name, node_type in gpu_types(launcher).items():
        # A node type's worker_setup_commands replace the global setup_commands: they must install everything.
        commands = " && ".join(node_type.get("worker_setup_commands", []))
        assert f'"tensorflow[and-cuda]=={tf}"' in commands, f"{name}: {commands}"
        assert f"pip install -e {checkout}" in commands, f"{name}: {commands}"
    cpu_setup = " ".join(launcher["setup_commands"])
    assert f"pip install -e {checkout}" in cpu_setup and "and-cuda" not in cpu_setup


def test_launcher_enables_token_auth_with_the_token_on_every_node(launcher):
    assert any(remote.endswith("/.ray/auth_token") and local == "~/.ray/auth_token"
               for remote, local in launcher["file_mounts"].items()), launcher["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in launcher[key] if "ray start" in c)
        assert re.search(r"RAY_AUTH_MODE=token\b.*ray start", start), f"{key}: {start}"


# --- KubeRay (kuberay-rayjob.yaml)


@pytest.fixture(scope="module")
def kuberay_docs() -> list[dict]:
    return load(CLUSTER / "kuberay-rayjob.yaml")


@pytest.fixture(scope="module")
def rayjob(kuberay_docs) -> dict:
    [job] = rayjobs(kuberay_docs)
    assert job["apiVersion"] == "ray.io/v1"
    return job


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_rayjob_has_the_fields_the_operator_needs(rayjob):
    spec = rayjob["spec"]
    assert re.fullmatch(r"python jobs/caption\.py --config configs/caption_s3_example\.toml", spec["entrypoint"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env.get("working_dir"), runtime_env
    env_vars = runtime_env["env_vars"]
    assert "TF_CPP_MIN_LOG_LEVEL" in env_vars and all(isinstance(v, str) for v in env_vars.values()), env_vars
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned("ray")
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"] and cluster["workerGroupSpecs"]


def test_rayjob_head_is_cpu_only_and_gpu_workers_scale_from_zero(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:  # KubeRay passes them to `ray start` as strings; the CRD rejects other types
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), group["rayStartParams"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in containers(head))
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
                         for c in containers(g))]
    assert gpu_groups, "no worker group has a container with limits nvidia.com/gpu >= 1"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, group["groupName"]
        assert group.get("replicas", 0) == 0, group["groupName"]


def test_rayjob_pods_use_a_service_account_defined_with_it(kuberay_docs, rayjob):
    accounts = {d["metadata"]["name"] for d in kuberay_docs if d.get("kind") == "ServiceAccount"}
    cluster = rayjob["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["template"]["spec"].get("serviceAccountName") in accounts


def test_rayjob_image_is_documented_to_install_tensorflow_and_cuda():
    # The GPU pods get TensorFlow from their image, which the file's header describes how to build.
    text = (CLUSTER / "kuberay-rayjob.yaml").read_text()
    assert f'"tensorflow[and-cuda]=={pinned("tensorflow")}"' in text
    assert f"rayproject/ray:{pinned('ray')}-py311-gpu" in text


# --- the main job's config against the GPU nodes


def test_a_cnn_actors_gpu_request_fits_one_gpu_node(launcher, rayjob):
    """The main job's config (configs/caption_s3_example.toml) runs its CNN actors on GPUs, and asks for no more
    per actor than a GPU node of either cluster file has: an actor asking for more GPUs than any node type has
    is never placed, however far the cluster scales."""
    config = tomllib.loads((ROOT / "configs/caption_s3_example.toml").read_text())
    gpus = config.get("cnn", {}).get("gpus_per_actor", 0)
    assert gpus > 0, "the example runs its CNN on GPU nodes"
    assert gpus <= max(t["resources"]["GPU"] for t in gpu_types(launcher).values())
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert gpus <= max(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                       for g in groups for c in containers(g))
