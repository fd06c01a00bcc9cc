"""Process set-up: TensorFlow imported without its CPU-machine banners, other stderr output kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BANNERS = ("Could not find cuda drivers", "oneDNN custom operations are on", "absl::InitializeLog()")


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_tensorflow_is_imported_without_cpu_banners():
    plain = run_python("import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'; import tensorflow as tf; "
                       "tf.config.list_physical_devices('GPU')")
    quiet = run_python("from imgcap.runtime.logs import import_tensorflow; tf = import_tensorflow(); print(tf.__version__)")
    assert quiet.returncode == 0 and quiet.stdout.strip()
    assert not [b for b in BANNERS if b in quiet.stderr], quiet.stderr
    # What the filter is for: on a machine without CUDA the plain import prints them despite the log level.
    if "cuda" not in plain.stderr.lower():
        return  # a machine with CUDA drivers prints no such line either way
    assert any(b in plain.stderr for b in BANNERS)


def test_other_stderr_lines_still_reach_stderr(capfd):
    from imgcap.runtime.logs import _stderr_without

    with _stderr_without(("noise",)):
        os.write(2, b"some noise line\na real error line\n")
    err = capfd.readouterr().err
    assert "a real error line" in err and "noise" not in err
