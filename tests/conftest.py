"""Shared fixtures (a local Ray cluster, a real S3 API on 127.0.0.1, the toy captioning problem and its trained
decoders) and the test-cost markers.

Markers (registered in pyproject.toml) say what a test needs beyond this Python process:

- ``ray``: a Ray cluster (``ray_local``, the three-node cluster of test_faults.py, the `ray start` head of
  test_job_submit.py);
- ``s3``: moto's S3 server (``s3_server``);
- ``browser``: headless Chromium (``browser``, `imgcap.testing.browser`);
- ``subprocess``: a child program of the test's own (``python -c``, ``jobs/*.py``, the ``ray`` CLI).

`pytest_collection_modifyitems` adds the first three from the fixtures a test uses, directly or through other
fixtures; ``subprocess`` is written on the test. A test without any of the four that starts a process fails
(`_no_unmarked_processes`), so the fast loop (`make test-unit`: ``-m "not slow and not (ray or s3 or browser
or subprocess)"``) never starts a cluster, a server, a browser or a child process. Under pytest-xdist the
hook also puts every ``ray`` test into one group (`make test`: two pytest processes, one taking the Ray tests
one after another, the other the rest).
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imgcap.testing.browser import Browser, chromium_binary
from imgcap.testing.fixtures import free_ports

# Fixture -> the markers of every test that uses it (directly or through another fixture).
FIXTURE_MARKERS = {
    "ray_local": ("ray",),
    "three_nodes": ("ray",),  # test_faults.py: a head and two worker raylets (ray.cluster_utils.Cluster)
    "ray_head": ("ray", "subprocess"),  # test_job_submit.py: `ray start --head` and `ray job submit`
    "s3_server": ("s3",),
    "browser": ("browser",),  # headless Chromium (imgcap.testing.browser)
}
# A test with one of these may start processes; any other test that does fails.
PROCESS_MARKERS = ("ray", "browser", "subprocess")

# Keras' first import asks for `uname -p` (platform.processor(), through optree): asked once here, before any
# test's process guard is armed, so the answer is cached and the first test to import Keras starts nothing.
platform.processor()


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers and xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fixture, markers in FIXTURE_MARKERS.items():
            if fixture in fixtures:
                for marker in markers:
                    if item.get_closest_marker(marker) is None:
                        item.add_marker(marker)
        if xdist and item.get_closest_marker("ray") is not None:
            # `make test` runs two pytest processes (--dist loadgroup): every Ray test goes to the same one, so
            # one Ray cluster runs at a time. Two at once on 2 cores starved `ray start` of the 30 s Ray gives
            # a raylet to register ("The current node timed out during startup").
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(autouse=True)
def _no_unmarked_processes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail a test that starts a child process (a Ray cluster included) without a marker saying so."""
    if any(request.node.get_closest_marker(m) for m in PROCESS_MARKERS):
        return

    def refuse(self, args, *rest, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process ({args!r}) but is marked none of "
                             f"{', '.join(PROCESS_MARKERS)}: mark it @pytest.mark.subprocess, or use the fixture "
                             f"that starts the cluster / browser (tests/conftest.py FIXTURE_MARKERS)")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


# moto accepts any credentials; these fakes also guarantee no test ever signs a request with real ones.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# Where tests arm injected faults (imgcap.runtime.fault_injection): every Ray worker of the test clusters reads it.
FAULTS_FILE = Path(tempfile.gettempdir()) / f"imgcap-test-faults-{os.getpid()}"
TEST_WORKER_ENV = {**FAKE_AWS_ENV, "TF_CPP_MIN_LOG_LEVEL": "2", "IMGCAP_TEST_FAULTS": str(FAULTS_FILE)}


def start_local_ray() -> None:
    """The 2-CPU local Ray of the test session. Its workers get the fake AWS credentials, so Ray tasks can read
    from the `s3_server` fixture, and the fault file; the dashboard runs for the jobs' recovery reports."""
    import ray

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": TEST_WORKER_ENV})


@pytest.fixture(scope="session")
def ray_local() -> Iterator[object]:
    """The session's local Ray cluster (`start_local_ray`), shared by the tests that need one."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 at a free port; yields its endpoint URL. The test process gets the fake
    credentials (and no AWS profile) for the session."""
    server_mod = pytest.importorskip("moto.server")
    port = free_ports()[0]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAKE_AWS_ENV.items():
            patch.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(key, raising=False)
        yield f"http://127.0.0.1:{port}"
    server.stop()


@contextmanager
def nothing_started_on(ray) -> Iterator[None]:
    """Assert that the block created no actor and no placement group on the Ray cluster: what it refused was
    refused before any worker, actor or Ray Train run existed."""
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # this cluster's, not whichever else runs on the machine

    def actors() -> dict[str, str]:
        return {a.actor_id: a.class_name
                for a in list_actors(address=address, limit=10_000, raise_on_missing_output=False)}

    actors_before, groups_before = actors(), set(ray.util.placement_group_table())
    yield
    new_actors = {k: v for k, v in actors().items() if k not in actors_before}
    new_groups = set(ray.util.placement_group_table()) - groups_before
    assert not new_actors and not new_groups, f"started actors {sorted(new_actors.values())}, placement groups {new_groups}"


# --- the toy captioning problem (tests/toy.py) and decoders trained on it once per session


@pytest.fixture(scope="session")
def toy():
    """The toy problem split for training (`toy.ToyTraining`)."""
    from toy import make_toy_training

    return make_toy_training()


@pytest.fixture(scope="session")
def toy_models(toy):
    """Toy decoders trained once per session, by architecture (`toy.ToyModels.trained`)."""
    from toy import ToyModels

    return ToyModels(toy)


@pytest.fixture(params=["merge", "inject"])
def trained_toy(request, toy_models):
    """Each architecture's toy decoder after 6 cross-entropy epochs (shared: tests must not train it further)."""
    return toy_models.trained(request.param)


# --- the shared Flickr8k photos (../shared) through the extraction job, once per session


@pytest.fixture(scope="session")
def shared_mobilenet_features(ray_local, tmp_path_factory):
    """configs/extract_flickr8k.toml run once per session on the local Ray: MobileNetV2 features of the 300
    shared Flickr8k photos with the shared weights, checked by test_extract.py (against the shared .npz) and
    captioned by test_caption_images.py. Returns (the `ExtractionSummary`, the output directory); skips when
    ../shared lacks the photos or the weights."""
    from _imaging import SHARED

    from imgcap.batch.extract import extract_features
    from imgcap.config.jobs import ExtractConfig
    from imgcap.config.loader import load_config

    config_file = Path(__file__).resolve().parents[1] / "configs" / "extract_flickr8k.toml"
    weights = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    if not (SHARED / "flickr8k" / "Images").is_dir() or not weights.is_file():
        pytest.skip(f"the shared Flickr8k images and MobileNetV2 weights are not in {SHARED}")
    output = tmp_path_factory.mktemp("shared_mobilenet_features") / "features"
    config = load_config(ExtractConfig, config_file, {"output_dir": str(output)})
    return extract_features(config), output


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """Headless Chromium (imgcap.testing.browser), one for the session; skips where it is not installed."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium is not installed (no /usr/bin/chromium, no `chromium` on PATH): "
                    "the contact sheet is not rendered in a browser")
    logs = tmp_path_factory.mktemp("chromium")
    with tempfile.TemporaryDirectory(prefix="imgcap-chromium-") as profile:
        chrome = Browser(binary, profile, logs / "chromium.log")
        try:
            yield chrome
        finally:
            chrome.close()
