"""The Ray Train job's console: one line per epoch and the early stops, printed by the driver.

Ray Train's workers log to Ray's log files (imgcap attaches with ``log_to_driver=False``), so the driver
reads what they did from the run itself: every epoch ends with a checkpoint whose `TrainingState` holds the
whole history, and a thread polls the run directory for the newest one while ``trainer.fit()`` blocks.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from imgcap.config.training import TrainJobConfig
from imgcap.train.state import (
    TrainingState,
    find_latest_checkpoint,
    read_checkpoint_meta,
    training_phases,
)

log = logging.getLogger(__name__)


class EpochWatch:
    """Print the epochs a Ray Train run adds to its run directory (`path` on `filesystem`), from the moment
    it is started until `stop`; epochs already there (a continued or resumed run) are not printed again."""

    def __init__(self, config: TrainJobConfig, filesystem: Any, path: str, seen: int = 0,
                 interval_s: float = 2.0) -> None:
        self.filesystem, self.path, self.seen, self.interval_s = filesystem, path, seen, interval_s
        self.epochs = {phase.name: phase.config for phase in training_phases(config)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imgcap-epoch-watch", daemon=True)

    def __enter__(self) -> EpochWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last epoch's checkpoint may land between two polls

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Print the epochs of the newest checkpoint not printed yet."""
        try:
            latest = find_latest_checkpoint(self.path, self.filesystem)
            if latest is None:
                return
            state = TrainingState.from_meta(read_checkpoint_meta(latest, self.filesystem))
        except (OSError, ValueError, KeyError):  # a checkpoint being written or deleted: the next poll reads it
            return
        for metrics in state.history[self.seen:]:
            config = self.epochs.get(metrics.phase)
            log.info("%s", metrics.format(config.epochs if config else metrics.epoch))
        if len(state.history) > self.seen and state.stops_early(self.epochs[state.phase]):
            log.info("early stop: no better dev %s for %d epochs", self.epochs[state.phase].select_by,
                     self.epochs[state.phase].patience)
        self.seen = max(self.seen, len(state.history))
