"""Training in this one process (imgcap train): the same loop and outputs as the Ray Train job."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcap.config.training import TrainJobConfig
from imgcap.data.dataset import prepare_training_data
from imgcap.metrics.evaluate import EvaluationReport
from imgcap.train.batches import phase_batches, phase_sizes
from imgcap.train.evaluation import dev_evaluator
from imgcap.train.loop import fit
from imgcap.train.outputs import training_provenance, write_training_outputs
from imgcap.train.state import (
    EpochMetrics,
    TrainingState,
    best_of,
    describe_best,
    training_phases,
)
from imgcap.train.trainer import CaptionTrainer
from imgcap.train.warm_start import initial_model, start_model

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What `train_captioner` produced: the saved bundle, per-epoch history and the dev evaluation."""

    bundle_path: Path
    history: list[EpochMetrics]
    best_epoch: int  # in the last phase
    report: EvaluationReport

    def format(self) -> str:
        best = best_of(self.history, self.best_epoch)
        lines = [f"bundle -> {self.bundle_path}", f"  {len(self.history)} epoch(s)"]
        if best is not None:
            lines.append(f"  {describe_best(best)}; {best.images_per_second:.0f} images/s")
        return "\n".join(lines + ["  " + self.report.summary()])


def train_captioner(config: TrainJobConfig, progress: bool | None = None) -> TrainResult:
    """Single-process training job: data -> vocabulary -> model -> phases (cross-entropy, self-critical) ->
    bundle -> dev report.

    Writes into ``config.output_dir``: ``bundle/`` (see `imgcap.model.bundle`), ``history.csv`` and
    ``dev_report.json``. The coco scorer is used when pycocoevalcap is installed.
    """
    start = initial_model(config)
    data = prepare_training_data(config.data, config.text, start.vocab if start else None)
    log.info("vocabulary: %d words (text mode %s, min count %d); %d train / %d dev images, %d / %d captions",
             len(data.vocab), config.text.mode, config.text.min_count, len(data.train_ids), len(data.dev_ids),
             len(data.train), len(data.dev))
    model = start_model(config, data, start)
    evaluator = dev_evaluator(config, data, model)
    phases = training_phases(config)
    state = TrainingState(phases[0].name)
    for phase in phases:
        state.begin(phase.name)
        trainer = CaptionTrainer(model, phase.config, dropout=phase.dropout)
        stream = np.random.default_rng(phase.config.seed)  # one stream over the phase's epochs
        images, captions = phase_sizes(phase, config, data)
        fit(trainer, evaluator, state, phase_batches(phase, config, data, model, rng_for_epoch=lambda _: stream),
            num_images=images, num_captions=captions, progress=progress)
    bundle_path, report = write_training_outputs(config, model, data, state.history,
                                                training_provenance(config, state, start and start.source))
    return TrainResult(bundle_path, state.history, state.best_epoch, report)
