"""Continuing training: an existing run of the same job, or ray.resume_from, checked against the config.

Ray is imported inside the function that needs its version, on purpose: the checks load nothing else of it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcap.config.loader import ConfigError, config_to_dict
from imgcap.config.training import TrainJobConfig
from imgcap.data.text import Vocabulary
from imgcap.train.run_storage import (
    RUN_SNAPSHOT,
    RunLocation,
    is_local,
    path_exists,
    resolve_storage,
)
from imgcap.train.state import (
    CHECKPOINT_META,
    VOCAB_FILE,
    TrainingState,
    find_latest_checkpoint,
    read_checkpoint_meta,
    read_text,
    training_phases,
)

log = logging.getLogger(__name__)


def check_same_model(config: TrainJobConfig, saved: dict[str, Any], label: str, fix: str = "") -> None:
    """Refuse to start from weights made with other model or text settings: `saved` is the job config table
    of a bundle or checkpoint ({"model": ..., "text": ...}), `label` names it, `fix` ends the message. The GloVe
    file only initialises a model, so it may differ."""
    for table in ("model", "text"):
        ours = config_to_dict(getattr(config, table))
        for key, value in saved[table].items():
            if key != "glove_path" and ours.get(key) != value:
                raise ConfigError(f"{table}.{key} is {ours.get(key)!r} but {label} was trained with {value!r}; "
                                  f"set {table}.{key} = {value!r}" + (f" to continue it, {fix}" if fix else ""))


def check_resume(config: TrainJobConfig, checkpoint: str | Path, filesystem: Any = None, *,
                  label: str | None = None, fix: str = "or drop ray.resume_from") -> tuple[dict[str, Any], Vocabulary]:
    """The checkpoint's meta and vocabulary, if its model, text settings and weight averaging fit `config`;
    else a `ConfigError` naming the key (`label` describes the checkpoint, `fix` ends the message)."""
    meta = read_checkpoint_meta(checkpoint, filesystem)
    if filesystem is None:
        vocab = Vocabulary.load(Path(checkpoint) / VOCAB_FILE)
    else:
        vocab = Vocabulary.from_json(read_text(filesystem, f"{checkpoint}/{VOCAB_FILE}"))
    label = label or f"the checkpoint {checkpoint}"
    saved = meta["job"]
    check_same_model(config, saved, label, fix)
    phase = meta["phase"]
    phases = {p.name: p for p in training_phases(config)}
    if phase not in phases:
        wanted = ("scst.enabled = true (and no scst.init_from)" if phase == "scst"
                  else "no scst.init_from (it skips the cross-entropy phase)")
        raise ConfigError(f"{label} is in the {phase} phase, which this config does not train; set {wanted} to "
                          f"continue it, {fix}")
    table = "train" if phase == "xe" else "scst"
    saved_ema = saved.get(table, {}).get("weight_ema", 0.0)
    if saved_ema != phases[phase].config.weight_ema:
        raise ConfigError(f"{table}.weight_ema is {phases[phase].config.weight_ema!r} but {label} was trained with "
                          f"{saved_ema!r} (its optimizer state holds the average or not); set it back to continue "
                          f"it, {fix}")
    return meta, vocab


@dataclass
class ExistingRun:
    """A run of this job's name already in storage: Ray Train V2 will restore it (see the module docstring)."""

    checkpoint: str  # its latest checkpoint, on the run's filesystem
    meta: dict[str, Any]
    vocab: Vocabulary
    finished: bool = False  # nothing left to train (`run_is_finished`): no worker is started


def existing_run(config: TrainJobConfig, run: RunLocation) -> ExistingRun | None:
    """The run Ray Train V2 will restore (its snapshot's latest checkpoint), checked against `config`."""
    import ray

    fix = (f"or choose another output_dir or ray.run_name to start a new run (ray.resume_from = \"{run.uri}\" "
           f"starts one from this run's latest checkpoint)")
    snapshot_path = f"{run.path}/{RUN_SNAPSHOT}"
    if not path_exists(run.filesystem, snapshot_path, "file"):
        if path_exists(run.filesystem, run.path, "dir") and find_latest_checkpoint(run.path, run.filesystem):
            log.warning("the run directory %s holds checkpoints but no Ray Train snapshot (%s): Ray Train starts "
                        "the run from scratch there", run.uri, RUN_SNAPSHOT)
        return None
    try:
        snapshot = json.loads(read_text(run.filesystem, snapshot_path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the Ray Train run {run.name} in {run.storage_uri} cannot be continued: its {RUN_SNAPSHOT} "
                          f"is unreadable ({exc}); {fix.removeprefix('or ')}") from None
    if snapshot.get("ray_version") != ray.__version__:
        raise ConfigError(f"the Ray Train run {run.name} in {run.storage_uri} was written by Ray "
                          f"{snapshot.get('ray_version')} and Ray Train {ray.__version__} cannot restore it; "
                          f"{fix.removeprefix('or ')}")
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if not latest:
        return None  # no checkpoint yet: Ray Train starts the run over
    checkpoint = f"{run.path}/{latest}"
    if not path_exists(run.filesystem, f"{checkpoint}/{CHECKPOINT_META}", "file"):
        raise ConfigError(f"the Ray Train run {run.name} in {run.storage_uri} lists its latest checkpoint {latest} "
                          f"but it is not there; {fix.removeprefix('or ')}")
    meta, vocab = check_resume(config, checkpoint, run.filesystem,
                                label=f"the existing run {run.name} in {run.storage_uri} (rerunning a job "
                                      f"continues its run; checkpoint {run.display(checkpoint)})", fix=fix)
    return ExistingRun(checkpoint, meta, vocab)


def run_is_finished(meta: dict[str, Any], config: TrainJobConfig) -> bool:
    """Whether the worker loop would train no epoch from this checkpoint: its last phase has its epochs, or
    stopped early (``patience`` epochs without a better dev score)."""
    return TrainingState.from_meta(meta).finished(training_phases(config))


def resume_checkpoint(config: TrainJobConfig) -> tuple[str, Any, dict[str, Any], Vocabulary]:
    """``ray.resume_from``'s latest checkpoint (a path on its filesystem; the filesystem, None when local),
    its meta and vocabulary, checked against the config."""
    location = config.ray.resume_from
    try:
        filesystem, root = resolve_storage(location, config.ray.storage_endpoint_url)
        present = path_exists(filesystem, root)
    except Exception as exc:
        raise ConfigError(f"ray.resume_from: cannot open {location}: {exc}; point it at a checkpoint, run or output "
                          f"directory of an earlier run") from None
    if not present:
        raise ConfigError(f"ray.resume_from: {location} does not exist; point it at a checkpoint, "
                          f"run or output directory of an earlier run")
    checkpoint = find_latest_checkpoint(root, filesystem)
    if checkpoint is None:
        raise ConfigError(f"ray.resume_from: no imgcap checkpoint ({CHECKPOINT_META}) under "
                          f"{location}; point it at a checkpoint, run or output directory")
    local = is_local(location)
    shown = checkpoint if local else f"{location.partition('://')[0]}://{checkpoint}"
    meta, vocab = check_resume(config, checkpoint, filesystem, label=f"the checkpoint {shown}")
    if run_is_finished(meta, config):
        table = "train" if meta["phase"] == "xe" else "scst"
        raise ConfigError(f"the checkpoint {shown} is at {meta['phase']} epoch {meta['epoch']} (best {meta['best_epoch']}) "
                          f"and its phase is done ({table}.epochs = {getattr(config, table).epochs}, "
                          f"{table}.patience = {getattr(config, table).patience}): nothing left to train; raise "
                          f"{table}.epochs or {table}.patience to continue"
                          + ("" if config.scst.enabled else ", or set scst.enabled = true to fine-tune it"))
    return checkpoint, (None if local else filesystem), meta, vocab
