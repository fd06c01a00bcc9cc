"""Test-only fault injection: make a stage of a running job fail once, at a chosen batch, the way real faults do.

The fault tests and ``benchmarks/faults.py`` point ``IMGCAP_TEST_FAULTS`` at a file, in the environment of
the driver and its Ray workers (a file, not the variable itself, so a test can arm faults on a Ray cluster
whose workers already run). Each line of the file is ``<stage>:<batch>:<marker file>[:raise]``. Each stage
calls `fault_point` once per batch it processes; the first process to reach its `batch`-th call of a named
stage creates the marker file (so the fault happens once per job, not again after the restart it causes)
and then either exits on the spot (``os._exit``: the actor or worker process dies as an OOM-killed one or one
on a lost node does), or with ``:raise`` raises `InjectedTransientError` (a transient failure the stage's
retry policy must absorb), or with ``:pause`` holds the batch for `PAUSE_SECONDS` (the marker, which names the
Ray node, tells the test where to strike meanwhile, e.g. remove that node). Without the variable, or without
the file, `fault_point` returns at once.

Stages: ``read`` (a read task, per shard batch), ``cnn`` (a CNN actor, per batch), ``caption`` (a
caption-decoding actor, per batch). Batches are counted per process, from 1.

Ray is imported only where a marker records its node, on purpose: the hook costs nothing when unarmed.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

FAULTS_ENV = "IMGCAP_TEST_FAULTS"
PAUSE_SECONDS = 5.0

# Batches each stage has seen in this process (a Ray worker process runs one actor, or tasks one at a time).
_calls: Counter[str] = Counter()


class InjectedTransientError(OSError):
    """A transient failure injected by `fault_point` (an OSError, as a failed read or write would be)."""


def fault_point(stage: str) -> None:
    """Count one batch of `stage` in this process and fail here if ``IMGCAP_TEST_FAULTS`` asks for it."""
    spec_file = os.environ.get(FAULTS_ENV)
    if not spec_file:
        return
    _calls[stage] += 1
    try:
        with open(spec_file, encoding="utf-8") as spec:
            faults = [line.strip() for line in spec if line.strip()]
    except FileNotFoundError:
        return
    for fault in faults:
        name, batch, marker, *mode = fault.split(":")
        # ">=": a pooled worker process may have counted batches of an earlier job already
        if name != stage or _calls[stage] < int(batch) or not _claim(marker, stage):
            continue
        if mode == ["raise"]:
            raise InjectedTransientError(f"{FAULTS_ENV}: injected transient failure of {stage} batch "
                                         f"{_calls[stage]} (pid {os.getpid()})")
        if mode == ["pause"]:
            time.sleep(PAUSE_SECONDS)
            return
        os._exit(1)  # no cleanup, no exception: the process vanishes as a killed one does


def _claim(marker: str, stage: str) -> bool:
    """Create `marker` unless it exists (atomically: one process of the job wins); True for the winner. The
    marker records the stage, the process and its Ray node (JSON)."""
    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    try:
        with open(marker, "x", encoding="utf-8") as out:
            out.write(json.dumps({"stage": stage, "pid": os.getpid(), "node_id": node}))
    except FileExistsError:
        return False
    return True

