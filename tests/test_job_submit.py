"""`ray job submit` of jobs/caption.py exactly as users run it: a real `ray start --head` with token
authentication, the Jobs CLI with `--working-dir .`, and the failure users hit without the token.

Token authentication in Ray 2.60 (read from ray/_private/authentication and ray/scripts/scripts.py):

- Every process decides from ``RAY_AUTH_MODE`` (``token`` / ``disabled``). `ray start --head` with the
  variable unset turns token mode on only when it finds a token, and warns either way; with it set it obeys.
- The token is ``RAY_AUTH_TOKEN`` (the value), else ``RAY_AUTH_TOKEN_PATH`` (a file), else ``~/.ray/auth_token``.
- The Jobs CLI / `JobSubmissionClient` send ``Authorization: Bearer <token>`` only when ``RAY_AUTH_MODE=token``
  is set in *their* environment: a token alone (even in ~/.ray/auth_token) is not sent, and the dashboard
  answers 401 "Missing authentication token" (a wrong token: 403 "Invalid authentication token").

The head here gets its own random token through the environment and a temporary HOME, so the test neither
reads nor writes the user's ~/.ray, and it runs next to any other local Ray (its own ports and temp dir; it
stops only the processes of the head it started).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _imaging import write_jpegs
from ray.job_submission import JobStatus, JobSubmissionClient

from imgcap.config.jobs import CaptionJobConfig
from imgcap.config.loader import load_config
from imgcap.config.model import DecodeConfig, ModelConfig, TextConfig
from imgcap.data.text import Vocabulary, normalize
from imgcap.testing.fixtures import free_ports

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: its `ray`, and the `python` job entrypoints run
RAY = BIN / "ray"
FEATURE_DIM = 768  # the `thumbnail` backbone's feature size
NUM_IMAGES = 12
JOB_TIMEOUT = 300  # seconds for the submitted job to finish
QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2"}


# --- the head -----------------------------------------------------------------------------------------------


def head_processes(session_id: int, temp_dir: str) -> dict[int, str]:
    """Live processes of the head started as session leader `session_id` with `--temp-dir=temp_dir`, by pid.

    Ray workers get a process group of their own (so killing the head's group misses them) but stay in its
    session; job drivers start a session of their own but run in the job's working dir under the temp dir.
    Other Ray clusters on the machine match neither.
    """
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(Path(entry.path, "cwd"))
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if state != "Z" and (int(session) == session_id or temp_dir in cmdline or cwd.startswith(temp_dir)):
            found[int(entry.name)] = cmdline[:160]
    return found


def stop_head(head: subprocess.Popen, temp_dir: str) -> dict[int, str]:
    """Stop the head started by `ray_head` and everything it started; returns the processes still alive after.

    Not `ray stop`: it stops every Ray on the machine. Not a SIGTERM to the head's process group either: the
    GCS would die before `ray start` is done with it, and the workers are not in that group anyway. The head
    alone is signalled, it stops what it started; stragglers of its session get a SIGKILL.
    """
    head.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes, then exits
    try:
        head.wait(timeout=90)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    deadline = time.monotonic() + 30  # dashboard subprocesses and workers exit within seconds of the head
    while (left := head_processes(head.pid, temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # stragglers: only processes of this head
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1)
    return head_processes(head.pid, temp_dir)


def auth_client(address: str, env: dict[str, str]) -> JobSubmissionClient:
    """A Jobs SDK client for the test's own polling. It is given the token as an explicit header rather than
    through this process's environment: that must not change (other tests' local Ray shares this process)."""
    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """A real 2-CPU head (`ray start --head --block`) with token authentication; yields its dashboard address
    (what `ray job submit --address` takes) and the environment of an authorised client."""
    if not RAY.is_file():
        pytest.skip(f"no `ray` executable next to {sys.executable}")
    home = tmp_path_factory.mktemp("ray_home")
    # Ray puts unix sockets under the temp dir (<temp>/session_<date>_<pid>/sockets/plasma_store) and their
    # paths must stay under ~107 characters: pytest's tmp_path is too deep, so a short dir directly in /tmp.
    temp_dir = os.path.realpath(tempfile.mkdtemp(prefix="rayjs-", dir="/tmp"))
    # Nothing of the caller's Ray set-up leaks in (RAY_ADDRESS, or RAY_AUTH_MODE that ray.init() of another
    # test exported into this process); the venv's bin goes first on PATH, as for a user who activated the
    # venv before `ray start`: job entrypoints (`python jobs/caption.py`) run with the head's PATH.
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base |= {"HOME": str(home), "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}", **QUIET_TF}
    # The head's own token, given as a value: RAY_AUTH_TOKEN comes before any token file, and with HOME
    # temporary there is no ~/.ray/auth_token to find or create. Drivers and workers inherit both variables.
    env = base | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # 256 bits, as Ray's
    gcs, dashboard, client_server, agent_http = free_ports(4)
    command = [
        str(RAY), "start", "--head", "--block", "--disable-usage-stats", "--log-style=record",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", f"--temp-dir={temp_dir}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        # Ports with fixed defaults would clash with another local Ray: 10001, 52365, and workers 10002-19999
        # (0/0 lets the OS pick worker ports). The other agent and metrics ports default to OS-picked ones.
        f"--ray-client-server-port={client_server}", f"--dashboard-agent-listen-port={agent_http}",
        "--min-worker-port=0", "--max-worker-port=0",
    ]
    log_path = home / "ray_start.log"
    with open(log_path, "wb") as log:
        # Its own session: the test owns the head process, and the session id marks everything it starts.
        # A SIGTERM makes `ray start --block` drain the node first, for up to 30 s; after a Ray Data job its
        # leftover detached actors (_StatsActor ...) keep the node busy for all of them. Nothing here needs a
        # drain: 0 turns it off (for the head's processes only, not the clients).
        head = subprocess.Popen(command, env=env | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, cwd=home,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline, error = time.monotonic() + 120, None
        while True:  # ready once the Jobs API answers an authorised client
            if head.poll() is not None:
                pytest.fail(f"`ray start --head` exited with {head.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                auth_client(address, env).list_jobs()
                break
            except Exception as exc:  # ConnectionError while the dashboard starts
                error = exc
            if time.monotonic() > deadline:
                pytest.fail(f"the head's Jobs API did not come up in 120 s ({error}):\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield address, env
    finally:
        left = stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the test's Ray head survived it: {left}"


def submit_caption_job(address: str, env: dict[str, str], config: Path) -> subprocess.CompletedProcess:
    """`ray job submit` of jobs/caption.py as the README says, from the repository root: `--working-dir .`
    uploads the checkout (minus .gitignore'd files: .venv, runs/) and the job runs from that copy."""
    return subprocess.run(
        [str(RAY), "job", "submit", "--address", address, "--no-wait", "--working-dir", ".",
         "--runtime-env-json", json.dumps({"env_vars": QUIET_TF}),
         "--", "python", "jobs/caption.py", "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


# --- the job's inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionInputs:
    bundle: Path
    images: Path
    image_ids: list[str]


@pytest.fixture(scope="module")
def caption_inputs(tmp_path_factory) -> CaptionInputs:
    """An untrained (but real) bundle over `thumbnail` features and a directory of NUM_IMAGES real JPEGs, at
    absolute paths: the job runs from an uploaded copy of the repository, not from here."""
    from imgcap.runtime.logs import quiet_tensorflow

    quiet_tensorflow()  # before the first TensorFlow import (below), as the jobs do
    from imgcap.model.bundle import CaptionBundle
    from imgcap.model.decoder import build_model
    from imgcap.vision.spec import EmbeddingSpec

    work = tmp_path_factory.mktemp("caption_inputs")
    captions = ["A dog runs on the grass.", "A red car is parked.", "Two children play with a ball."]
    vocab = Vocabulary.build([normalize(c) for c in captions], min_count=1)
    model = build_model(ModelConfig(embedding_dim=16, units=16), vocab, FEATURE_DIM, seed=0)
    embedding = EmbeddingSpec("thumbnail")
    bundle = CaptionBundle(model, vocab, TextConfig(min_count=1), DecodeConfig(beam_width=1, max_length=8),
                           embedding).save(work / "bundle")
    images = write_jpegs(work / "images", NUM_IMAGES, prefix="img_")
    return CaptionInputs(bundle, work / "images", [p.stem for p in images])


def caption_job_config(inputs: CaptionInputs, output_dir: Path) -> dict:
    """The job's TOML table: the one place saying what jobs/caption.py reads (images -> captions, the bulk job;
    the `thumbnail` backbone needs no weights)."""
    return {"bundle": str(inputs.bundle), "sources": [{"path": str(inputs.images)}], "output_dir": str(output_dir),
            "actors": 1, "batch_size": 8, "cnn": {"weights": "none", "batch_size": 8}}


def write_toml(table: dict, path: Path) -> Path:
    """`table` as a TOML file of top-level keys (strings, numbers, booleans, lists, inline tables)."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"no TOML form for {v!r}")

    path.write_text("".join(f"{k} = {value(v)}\n" for k, v in table.items()), encoding="utf-8")
    return path


# --- the tests ----------------------------------------------------------------------------------------------


MISSING = "Unauthorized: Missing authentication token"  # HTTP 401
INVALID = "Forbidden: Invalid authentication token"  # HTTP 403


@pytest.mark.parametrize("mode, token, refusal", [
    pytest.param(None, None, MISSING, id="no-token"),
    pytest.param(None, "right", MISSING, id="token-without-RAY_AUTH_MODE"),  # the token is never sent
    pytest.param("token", "wrong", INVALID, id="wrong-token"),
])
def test_submit_without_the_token_is_refused(ray_head, tmp_path, mode, token, refusal):
    address, env = ray_head
    client_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}
    if mode:
        client_env["RAY_AUTH_MODE"] = mode
    if token:
        client_env["RAY_AUTH_TOKEN"] = env["RAY_AUTH_TOKEN"] if token == "right" else secrets.token_hex(32)
    jobs_before = len(auth_client(address, env).list_jobs())
    result = submit_caption_job(address, client_env, tmp_path / "never_read.toml")
    assert result.returncode != 0
    assert "ray.exceptions.AuthenticationError" in result.stderr and refusal in result.stderr, result.stderr[-3000:]
    assert len(auth_client(address, env).list_jobs()) == jobs_before  # refused before anything was submitted


def test_job_submit_with_token_captions_every_image(ray_head, caption_inputs, tmp_path):
    address, env = ray_head
    output = tmp_path / "out"
    config = write_toml(caption_job_config(caption_inputs, output), tmp_path / "caption_job.toml")
    load_config(CaptionJobConfig, config)  # a config error here, rather than in the job's log

    client = auth_client(address, env)
    jobs_before = len(client.list_jobs())
    result = submit_caption_job(address, env, config)
    if result.returncode and "requests.exceptions.ConnectionError" in result.stderr \
            and len(client.list_jobs()) == jobs_before:
        # The head's dashboard dropped the connection before the job existed (seen once, with the machine at a
        # load of 16): nothing was submitted, so submit again, as its user would.
        result = submit_caption_job(address, env, config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"Job '([^']+)' submitted successfully", result.stdout + result.stderr)
    assert match, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = match.group(1)

    deadline = time.monotonic() + JOB_TIMEOUT
    while not (status := client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} is {status}; its log:\n{client.get_job_logs(job_id)[-6000:]}"

    rows = pq.read_table(output / "captions").to_pylist()
    assert sorted(r["image_id"] for r in rows) == caption_inputs.image_ids  # one row per input image
    assert all(r["error"] is None and isinstance(r["caption"], str) for r in rows), rows
    assert {r["source"] for r in rows} == {str(caption_inputs.images / f"{i}.jpg") for i in caption_inputs.image_ids}
    assert (output / "report.html").is_file()  # the contact sheet is written next to the captions
