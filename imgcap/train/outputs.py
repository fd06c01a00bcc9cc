"""What a training job leaves: the bundle of its best epoch, history.csv and dev_report.json."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from imgcap.config.loader import config_to_dict
from imgcap.config.training import TrainJobConfig
from imgcap.data.dataset import TrainingData
from imgcap.metrics.evaluate import EvaluationReport, coco_available
from imgcap.model.bundle import CaptionBundle
from imgcap.model.decoder import Decoder
from imgcap.train.evaluation import evaluate_bundle_on_dev
from imgcap.train.state import EpochMetrics, TrainingState, training_phases
from imgcap.vision.spec import EmbeddingSpec

log = logging.getLogger(__name__)


def training_provenance(config: TrainJobConfig, state: TrainingState, init_from: str | None) -> dict[str, Any]:
    """What a bundle records of its training: the job config, the phases, the best epoch of the last, the
    history, and what self-critical training started from (``scst.init_from``)."""
    return {"train_job": config_to_dict(config), "phases": [p.name for p in training_phases(config)],
            "phase": state.phase, "best_epoch": state.best_epoch, "history": [h.as_dict() for h in state.history],
            "init_from": init_from}


def write_history(history: list[EpochMetrics], path: Path) -> None:
    """The per-epoch metrics as CSV (one row per epoch)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0].as_dict()) if history else ["epoch"])
        writer.writeheader()
        writer.writerows(h.as_dict() for h in history)


def training_embedding(config: TrainJobConfig, data: TrainingData) -> EmbeddingSpec | None:
    """How the training features were made: as extraction recorded it next to Parquet features, else (an
    .npz records nothing) `data.backbone` with the extraction defaults; None when neither says."""
    recorded = data.embedding
    if recorded is not None:
        if config.data.backbone and config.data.backbone != recorded.tag:
            log.warning("data.backbone = %r but %s were made with %r: the bundle records %r",
                        config.data.backbone, config.data.features, recorded.tag, recorded.tag)
        return recorded
    return EmbeddingSpec.from_tag(config.data.backbone) if config.data.backbone else None


def write_training_outputs(config: TrainJobConfig, model: Decoder, data: TrainingData,
                           history: list[EpochMetrics], provenance: dict) -> tuple[Path, EvaluationReport]:
    """What every training job leaves in ``config.output_dir``: the bundle, history.csv, dev_report.json."""
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    bundle = CaptionBundle(model, data.vocab, config.text, config.decode, training_embedding(config, data),
                           provenance)
    bundle_path = bundle.save(config.bundle_path)
    write_history(history, output / "history.csv")
    report = evaluate_bundle_on_dev(bundle, data, coco=coco_available())
    (output / "dev_report.json").write_text(json.dumps(report.as_dict(), indent=2), encoding="utf-8")
    return bundle_path, report
