"""What an idle local Ray cluster costs this machine: the CPU-seconds its processes use in a minute of doing
nothing, with and without the dashboard (the test session's cluster runs it: the jobs' recovery reports read
Ray's state API).

    .venv/bin/python benchmarks/bench_ray_idle.py [--seconds 60]

Each case starts `ray.init(address="local", num_cpus=2)` as the tests do, waits 20 s for start-up to settle,
then reads every process's user + system CPU time from /proc before and after `--seconds` of idling. Counts
every process on the machine (Ray's GCS, raylet, dashboard and its modules, agents, log monitor, idle
workers, and anything else that runs meanwhile), so run it on an otherwise idle machine. Linux only.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import ray


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (command line, user + system CPU seconds so far) for every process /proc shows."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while being read
            continue
        found[int(entry.name)] = (_name(command), (int(fields[11]) + int(fields[12])) / ticks)
    return found


def _name(command: str) -> str:
    """A short name for a command line: a Ray worker's title (``ray::IDLE``), a dashboard module's process
    title, else the script (``log_monitor.py``) or the binary (``raylet``) it runs."""
    words = command.split()
    if not words or words[0].startswith(("ray::", "ray-dashboard-")):
        return words[0] if words else "?"
    script = next((w for w in words if w.endswith(".py")), words[0])
    return script.rsplit("/", 1)[-1]


def idle_cost(dashboard: bool, seconds: float) -> tuple[float, list[tuple[float, str]]]:
    """CPU-seconds used in `seconds` by every process while a fresh local cluster idles, and the largest users."""
    ray.init(address="local", num_cpus=2, include_dashboard=dashboard, log_to_driver=False)
    try:
        time.sleep(20)
        before = cpu_seconds_by_process()
        time.sleep(seconds)
        after = cpu_seconds_by_process()
    finally:
        ray.shutdown()
    used = [(cpu - before.get(pid, (command, 0.0))[1], command) for pid, (command, cpu) in after.items()]
    return sum(u for u, _ in used), sorted(used, reverse=True)[:5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    print(f"| local cluster, idle {args.seconds:g} s | CPU-s per minute | share of one core | largest users |")
    print("|---|---:|---:|---|")
    for dashboard in (True, False):
        total, top = idle_cost(dashboard, args.seconds)
        per_minute = total * 60 / args.seconds
        users = ", ".join(f"{name} {cpu:.1f}" for cpu, name in top)
        print(f"| {'with' if dashboard else 'without'} the dashboard | {per_minute:.1f} | "
              f"{per_minute / 60:.0%} | {users} |")


if __name__ == "__main__":
    main()
