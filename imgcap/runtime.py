"""Process set-up shared by every job: quiet TensorFlow logs and one way to attach to Ray.

`quiet_tensorflow` must run before TensorFlow is first imported: TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL``
once, at import, and prints its CUDA / oneDNN banners then. The job scripts in ``jobs/`` call it before they
import anything of imgcap, and the Ray actors and train workers call it before their lazy TensorFlow import,
so a CPU machine prints no CUDA banner. Setting an already-set variable is left to the user
(``TF_CPP_MIN_LOG_LEVEL=0`` brings the banners back).

`init_ray` is the only place imgcap starts or attaches to Ray; library functions call it (never a bare
``ray.init()``) so the same code runs under ``ray job submit`` (``RAY_ADDRESS`` set by the job server), on a
cluster node, or on a laptop, where it starts a local Ray.
"""

from __future__ import annotations

import logging
import os

# Environment variables TensorFlow reads at import time, and what keeps them quiet on a CPU machine:
# 2 hides INFO and WARNING lines of TensorFlow's C++ side (CUDA probing, oneDNN notices, cpu feature guards).
QUIET_TF_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}


def quiet_tensorflow() -> None:
    """Keep TensorFlow's import-time C++ banners out of job logs (a no-op for variables already set)."""
    for key, value in QUIET_TF_ENV.items():
        os.environ.setdefault(key, value)


def setup_logging() -> None:
    """Job logging: INFO for imgcap, quiet TensorFlow (see `quiet_tensorflow`)."""
    quiet_tensorflow()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def init_ray() -> None:
    """Attach to the cluster of ``ray job submit`` / ``RAY_ADDRESS``, or start a local Ray; no-op if attached.

    A local Ray started here inherits this process's environment (so the quiet TensorFlow settings reach
    its workers); on a cluster the actors quiet TensorFlow themselves before importing it.
    """
    import ray

    if ray.is_initialized():
        return
    quiet_tensorflow()
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
