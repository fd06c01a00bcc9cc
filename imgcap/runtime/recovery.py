"""What Ray recovered from while a job ran (restarts, retries, lost nodes).

Ray is imported inside the methods on purpose: importing this module starts nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

log = logging.getLogger(__name__)
if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Recovery:
    """What Ray recovered from while a job ran, as its state API recorded it."""

    actor_restarts: dict[str, int]  # actor class -> restarts (a dead actor brought back with its state lost)
    task_retries: dict[str, int]  # task or actor method -> failed attempts that were run again
    nodes_lost: int  # nodes that died while the job ran

    def format(self) -> str:
        """One line for a job's summary."""
        def counts(found: dict[str, int]) -> str:
            return ", ".join(f"{name} x{n}" for name, n in sorted(found.items())) or "none"

        return (f"recovered: nodes lost {self.nodes_lost}; actor restarts: {counts(self.actor_restarts)}; "
                f"task attempts retried: {counts(self.task_retries)}")

    @property
    def anything(self) -> bool:
        return bool(self.nodes_lost or self.actor_restarts or self.task_retries)


class RecoveryWatch:
    """Counts the actor restarts, task retries and lost nodes of Ray's recovery from the moment it is made (Ray
    must be initialised). Ray retries silently; this is how a job's summary can say what it retried. Ray's state
    API counts per Ray job, i.e. per driver, so what a driver recovered before (an earlier job in the same
    process) is taken as a baseline and left out. Reads the state API of the Ray dashboard: without one
    (``include_dashboard=False``) `report` is None."""

    def __init__(self) -> None:
        import ray

        context = ray.get_runtime_context()
        self.job_id = context.get_job_id()
        # this driver's cluster, named: left to itself the state API refuses to choose when a machine runs two
        self.address = context.gcs_address
        self.before = self._tally()

    def _tally(self) -> Recovery | None:
        """Everything recovered so far: lost nodes of the cluster, restarts and retries of this driver's job."""
        from ray.util.state import list_actors, list_nodes, list_tasks

        job = [("job_id", "=", self.job_id)]
        try:
            dead = list_nodes(address=self.address, filters=[("state", "=", "DEAD")], limit=10_000,
                              raise_on_missing_output=False)
            actors = list_actors(address=self.address, filters=job, detail=True, limit=10_000,
                                 raise_on_missing_output=False)
            failed = list_tasks(address=self.address, filters=[*job, ("state", "=", "FAILED")], limit=10_000,
                                raise_on_missing_output=False)
        except Exception as exc:  # no dashboard, or a state API that moved: the summary says less, nothing fails
            log.debug("Ray state API unavailable: %s", exc)
            return None
        restarts: Counter[str] = Counter()
        for actor in actors:
            restarts[actor.class_name] += int(actor.num_restarts or 0)
        # a failed attempt of a job that went on to finish was retried
        retries = Counter(task.name for task in failed if task.error_type != "TASK_CANCELLED")
        return Recovery(dict(restarts), dict(retries), len(dead))

    def report(self) -> Recovery | None:
        """What was recovered since this watch was made, or None when Ray's state API cannot say."""
        now = self._tally()
        if now is None or self.before is None:
            return None
        restarts = Counter(now.actor_restarts) - Counter(self.before.actor_restarts)  # drops the zeros
        retries = Counter(now.task_retries) - Counter(self.before.task_retries)
        return Recovery(dict(restarts), dict(retries), now.nodes_lost - self.before.nodes_lost)
