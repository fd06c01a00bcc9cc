"""Quiet logs: TensorFlow imported without its CPU-machine banners, and job logging.

`quiet_tensorflow` must run before TensorFlow is first imported: TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL``
once, at import. The job scripts in ``jobs/`` call it before they import anything of imgcap. Since 2.19
TensorFlow logs its CUDA / oneDNN start-up banners through absl, which ignores that variable, so
`import_tensorflow` imports it with those lines filtered out of stderr; imgcap's drivers, Ray actors and train
workers import TensorFlow through it, so a CPU machine prints no CUDA banner. An already-set variable is
left to the user (``TF_CPP_MIN_LOG_LEVEL=0``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


# Environment variables TensorFlow reads at import time, and what keeps them quiet on a CPU machine:
# 2 hides INFO and WARNING lines of TensorFlow's C++ side (CUDA probing, oneDNN notices, cpu feature guards).
QUIET_TF_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}


def quiet_tensorflow() -> None:
    """Keep TensorFlow's import-time C++ banners out of job logs (a no-op for variables already set)."""
    for key, value in QUIET_TF_ENV.items():
        os.environ.setdefault(key, value)


# What TensorFlow prints on a machine without a GPU when it is first imported and first asked for devices.
# Since 2.19 it logs these through absl, which ignores TF_CPP_MIN_LOG_LEVEL (tensorflow/tensorflow#100442), so
# they are filtered out of stderr around the import instead; every other line still reaches stderr.
_TF_CPU_BANNERS = ("Could not find cuda drivers", "oneDNN custom operations are on", "absl::InitializeLog()",
                   "failed call to cuInit", "To enable the following instructions",
                   "rebuild TensorFlow with the appropriate compiler flags", "Unable to register cu")


@contextlib.contextmanager
def _stderr_without(banners: tuple[str, ...]) -> Iterator[None]:
    """Capture file descriptor 2 (C++ writes there, not to sys.stderr) and re-emit it minus lines that hold
    one of `banners`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", errors="replace").splitlines(keepends=True):
                if not any(banner in line for banner in banners):
                    sys.stderr.write(line)
            sys.stderr.flush()


def import_tensorflow() -> Any:
    """TensorFlow, imported (the first time in this process) without its CPU-machine start-up banners.

    Called where imgcap first needs TensorFlow in a process (the jobs' drivers, the Ray actors and train
    workers), before any module that imports it at top level.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    quiet_tensorflow()
    with _stderr_without(_TF_CPU_BANNERS):
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the CUDA probe logs on the first device query
    return tf


def setup_logging() -> None:
    """Job logging: INFO for imgcap, quiet TensorFlow (see `quiet_tensorflow`), and Ray Train's driver-side
    notes (snapshot found, worker group starting: several lines each) only when they warn."""
    quiet_tensorflow()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ray.train").setLevel(logging.WARNING)
