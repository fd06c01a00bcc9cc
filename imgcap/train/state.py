"""The bookkeeping of a training run, shared by the single-process trainer and the Ray Train workers.

A run trains in phases: cross-entropy (``xe``, teacher forcing) and then, when ``[scst]`` is enabled,
self-critical training (``scst``). Each phase has its own optimisation settings (a `TrainConfig`), epoch
count, best epoch and patience; the history runs on over both. `TrainingState` is that bookkeeping: it
records an epoch's metrics, says whether the phase or the run is over, moves to the next phase, and goes to and
from the JSON metadata of a checkpoint, so a restored run takes exactly the decisions the interrupted one
would have. It holds no weights and imports no TensorFlow (the Ray driver reads it without a model).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from imgcap.config.training import TrainConfig, TrainJobConfig
from imgcap.io.storage import S3Options, filesystem_for

CHECKPOINT_META = "imgcap_checkpoint.json"  # TrainingState + job config + sizes
CHECKPOINT_STATE = "state"  # tf.train.Checkpoint prefix: state.index, state.data-* (model, optimizer, best weights)
VOCAB_FILE = "vocab.json"
PHASES = ("xe", "scst")  # in the order they run


@dataclass
class EpochMetrics:
    """What one epoch did; reported to the console, to Ray Train and into the bundle's provenance."""
    phase: str
    epoch: int  # 1-based, within the phase
    train_loss: float  # cross-entropy; in self-critical training the policy-gradient loss
    dev_loss: float
    dev_bleu4: float  # of greedy dev captions (NLTK corpus BLEU-4)
    dev_cider: float  # of greedy dev captions (CIDEr-D, document frequencies over the dev references)
    learning_rate: float
    seconds: float
    images_per_second: float
    captions_per_second: float  # captions trained on: references (xe) or samples (scst)
    steps: int  # optimisation steps (every worker takes this many)
    train_reward: float | None = None  # scst: mean CIDEr-D of the sampled captions

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self, epochs: int) -> str:
        """The epoch's console line; `epochs` is its phase's planned epoch count."""
        reward = "" if self.train_reward is None else f", sample reward {self.train_reward:.4f}"
        return (f"{self.phase} epoch {self.epoch}/{epochs}: train loss {self.train_loss:.4f}{reward}, dev loss "
                f"{self.dev_loss:.4f}, dev BLEU-4 {self.dev_bleu4:.4f}, dev CIDEr-D {self.dev_cider:.4f}, "
                f"{self.seconds:.1f} s, {self.images_per_second:.0f} images/s")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EpochMetrics:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def selection_score(metrics: EpochMetrics, select_by: str) -> float:
    """Higher is better: greedy dev BLEU-4 (``"bleu"``), dev CIDEr-D (``"cider"``) or minus the dev loss."""
    if select_by == "bleu":
        return metrics.dev_bleu4
    if select_by == "cider":
        return metrics.dev_cider
    return -metrics.dev_loss


def best_of(history: list[EpochMetrics], best_epoch: int) -> EpochMetrics | None:
    """The metrics of epoch `best_epoch` of the last phase in `history` (what a bundle is made of)."""
    last = history[-1].phase if history else None
    return next((h for h in history if h.phase == last and h.epoch == best_epoch), None)


def describe_best(best: EpochMetrics) -> str:
    """One line on a best epoch, for job summaries."""
    reward = "" if best.train_reward is None else f", sample reward {best.train_reward:.4f}"
    return (f"best epoch: {best.phase} epoch {best.epoch}, dev loss {best.dev_loss:.4f}, greedy dev BLEU-4 "
            f"{best.dev_bleu4:.4f}, CIDEr-D {best.dev_cider:.4f}{reward}")


@dataclass(frozen=True)
class Phase:
    """One phase of a run: its name, its optimisation settings and whether its steps apply dropout."""
    name: str  # "xe" or "scst"
    config: TrainConfig
    dropout: bool = True  # False: the steps' forward pass runs without dropout (scst.dropout = false)


def training_phases(job: TrainJobConfig) -> list[Phase]:
    """The phases `job` runs: cross-entropy unless self-critical training starts from ``scst.init_from``,
    then self-critical training when ``scst.enabled``."""
    phases = []
    if not (job.scst.enabled and job.scst.init_from):
        phases.append(Phase("xe", job.train))
    if job.scst.enabled:
        phases.append(Phase("scst", job.scst.train_config(job.train), dropout=job.scst.dropout))
    return phases


@dataclass
class TrainingState:
    """Where a run is: its phase, epochs done in the phase, the phase's best epoch, and every epoch's metrics."""
    phase: str
    epoch: int = 0  # epochs finished in this phase
    best_epoch: int = 0  # the phase's epoch with the best dev score (0: none yet)
    best_score: float = -math.inf
    history: list[EpochMetrics] = field(default_factory=list)

    def record(self, metrics: EpochMetrics, select_by: str) -> bool:
        """Add an epoch of the current phase; True when its dev score is the phase's best so far."""
        self.epoch = metrics.epoch
        self.history.append(metrics)
        score = selection_score(metrics, select_by)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, metrics.epoch
            return True
        return False

    def stops_early(self, config: TrainConfig) -> bool:
        """``patience`` epochs without a better dev score."""
        return bool(config.patience) and self.epoch - self.best_epoch >= config.patience

    def phase_done(self, config: TrainConfig) -> bool:
        """The phase has trained ``epochs`` epochs or stopped early."""
        return self.epoch >= config.epochs or self.stops_early(config)

    def begin(self, phase: str) -> None:
        """Move on to `phase`: a new epoch count, best epoch and score (its selection may differ)."""
        if phase != self.phase:
            self.phase, self.epoch, self.best_epoch, self.best_score = phase, 0, 0, -math.inf

    def finished(self, phases: list[Phase]) -> bool:
        """Nothing left to train: the state is in the last phase and that phase is done."""
        last = phases[-1]
        return self.phase == last.name and self.phase_done(last.config)

    def position(self) -> tuple[int, int]:
        """(phase index, epoch): orders the checkpoints of a run."""
        return PHASES.index(self.phase), self.epoch

    @property
    def phase_history(self) -> list[EpochMetrics]:
        return [h for h in self.history if h.phase == self.phase]

    def to_meta(self) -> dict[str, Any]:
        return {"phase": self.phase, "epoch": self.epoch, "best_epoch": self.best_epoch,
                "best_score": self.best_score, "history": [h.as_dict() for h in self.history]}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TrainingState:
        return cls(meta["phase"], int(meta["epoch"]), int(meta["best_epoch"]), float(meta["best_score"]),
                   [EpochMetrics.from_dict(h) for h in meta["history"]])


# --- finding checkpoints: local paths and pyarrow filesystem URIs


def read_text(filesystem: Any, path: str) -> str:
    with filesystem.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def _find_latest(filesystem: Any, root: str) -> str | None:

    if filesystem.get_file_info(f"{root}/{CHECKPOINT_META}").type == pafs.FileType.File:
        return root
    found = []
    for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.base_name != CHECKPOINT_META or info.type != pafs.FileType.File:
            continue
        directory = info.path.rsplit("/", 1)[0]
        try:
            position = TrainingState.from_meta(json.loads(read_text(filesystem, info.path))).position()
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint being written or deleted, or of another format
        if filesystem.get_file_info(f"{directory}/{CHECKPOINT_STATE}.index").type == pafs.FileType.File:
            found.append((position, info.mtime_ns or 0, directory))
    return max(found)[2] if found else None


def find_latest_checkpoint(path: str | Path, filesystem: Any = None) -> str | None:
    """The imgcap checkpoint directory furthest into training (phase, then epoch) at or below `path` (a
    checkpoint, a Ray run directory, a storage directory or a job's output directory), or None.

    `path` is a local path, a pyarrow filesystem URI (``s3://bucket/prefix``: the answer is a URI too), or a
    path on `filesystem` (the answer is a path on it).
    """
    path = str(path)
    if filesystem is not None:
        return _find_latest(filesystem, path.rstrip("/"))
    filesystem, root = filesystem_for(path.split("?", 1)[0], S3Options())
    found = _find_latest(filesystem, root)
    if found is None or "://" not in path:
        return found
    return f"{path.partition('://')[0]}://{found}"


def read_checkpoint_meta(directory: str | Path, filesystem: Any = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint: its `TrainingState` and the job config and sizes that made it."""
    if filesystem is None:
        return json.loads((Path(directory) / CHECKPOINT_META).read_text(encoding="utf-8"))
    return json.loads(read_text(filesystem, f"{directory}/{CHECKPOINT_META}"))
