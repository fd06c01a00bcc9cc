"""The bookkeeping of a training run (imgcap/train/state.py): the phases a job config makes, the state's
decisions (best epoch, early stop, phase done, run finished) and its checkpoint metadata."""

import json

from imgcap.config.loader import config_from_dict
from imgcap.config.training import TrainJobConfig
from imgcap.train.state import EpochMetrics, TrainingState, training_phases

DATA = {"captions": "c", "features": "f"}


def metrics(phase: str, epoch: int, bleu: float) -> EpochMetrics:
    return EpochMetrics(phase, epoch, 1.0, 2.0, bleu, 0.5, 1e-3, 1.0, 10.0, 50.0, 5)


def test_training_state_decides_stops_and_phases():
    job = config_from_dict(TrainJobConfig, {"data": DATA, "train": {"epochs": 5, "patience": 2},
                                            "scst": {"enabled": True, "epochs": 3, "select_by": "bleu"}})
    phases = training_phases(job)
    assert [p.name for p in phases] == ["xe", "scst"] and phases[1].config.label_smoothing == 0
    assert phases[0].dropout and phases[1].dropout  # scst.dropout defaults to true
    state = TrainingState("xe")
    for epoch, bleu in enumerate([0.1, 0.2, 0.15, 0.18], 1):
        improved = state.record(metrics("xe", epoch, bleu), "bleu")
        assert improved == (epoch <= 2)
    assert state.best_epoch == 2 and state.stops_early(phases[0].config) and state.phase_done(phases[0].config)
    assert not state.finished(phases)  # the self-critical phase is still to come
    state.begin("scst")
    assert (state.epoch, state.best_epoch) == (0, 0) and len(state.history) == 4
    for epoch in range(1, 4):
        state.record(metrics("scst", epoch, 0.1 + epoch / 100), "bleu")
    assert state.finished(phases) and state.best_epoch == 3
    assert TrainingState.from_meta(json.loads(json.dumps(state.to_meta()))) == state
    assert state.position() == (1, 3) and TrainingState("xe", 9).position() < state.position()


def test_self_critical_training_from_a_bundle_is_the_only_phase():
    assert [p.name for p in training_phases(config_from_dict(TrainJobConfig, {
        "data": DATA, "scst": {"enabled": True, "init_from": "b"}}))] == ["scst"]
