"""Process set-up: TensorFlow imported without its CPU-machine banners, other stderr output kept."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BANNERS = ("Could not find cuda drivers", "oneDNN custom operations are on", "absl::InitializeLog()")


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def messages(stderr: str) -> set[str]:
    """The lines of `stderr` without absl's per-line prefix (severity, time, thread id), so the lines of two
    processes compare."""
    return {re.sub(r"^[IWEF]\d{4} [\d:.]+\s+\d+ ", "", line) for line in stderr.splitlines() if line.strip()}


@pytest.mark.subprocess
def test_tensorflow_is_imported_without_cpu_banners():
    plain = run_python("import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'; import tensorflow as tf; "
                       "tf.config.list_physical_devices('GPU')")
    quiet = run_python("from imgcap.runtime.logs import import_tensorflow; tf = import_tensorflow(); print(tf.__version__)")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert quiet.returncode == 0 and quiet.stdout.strip()
    assert not [b for b in BANNERS if b in quiet.stderr], quiet.stderr
    plain_lines, quiet_lines = messages(plain.stderr), messages(quiet.stderr)
    # Every banner line the plain import printed despite the log level (a machine without CUDA drivers: the
    # CUDA and oneDNN ones) is gone from the quiet import ...
    banners = {line for line in plain_lines if any(b in line for b in BANNERS)}
    assert not banners & quiet_lines, quiet.stderr
    if "cuda" in plain.stderr.lower():  # (a machine with CUDA drivers prints no such line either way)
        assert banners, plain.stderr
    # ... and the quiet import only removes lines: it prints none that the plain import does not.
    assert quiet_lines <= plain_lines, (quiet.stderr, plain.stderr)


def test_other_stderr_lines_still_reach_stderr(capfd):
    from imgcap.runtime.logs import _stderr_without

    with _stderr_without(("noise",)):
        os.write(2, b"some noise line\na real error line\n")
    err = capfd.readouterr().err
    assert "a real error line" in err and "noise" not in err
