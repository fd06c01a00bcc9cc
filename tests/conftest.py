"""Shared fixtures: a local Ray cluster and a real S3 API (moto's server) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAKE_AWS_ENV.items():
            patch.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(key, raising=False)
        yield f"http://127.0.0.1:{port}"
    server.stop()
