"""Where training starts: fresh weights, or a bundle / checkpoint named by scst.init_from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcap.config.loader import ConfigError, config_to_dict
from imgcap.config.training import TrainJobConfig
from imgcap.data.dataset import TrainingData
from imgcap.data.text import Vocabulary
from imgcap.model.bundle import is_bundle_reference, load_bundle
from imgcap.model.decoder import Decoder, build_model, create_decoder
from imgcap.train.resume import check_same_model
from imgcap.train.state import (
    CHECKPOINT_META,
    VOCAB_FILE,
    find_latest_checkpoint,
    read_checkpoint_meta,
)
from imgcap.train.trainer import checkpoint_best_weights


@dataclass(frozen=True)
class InitialModel:
    """What self-critical training starts from when ``scst.init_from`` is set: a bundle's or checkpoint's
    vocabulary and weights."""

    source: str
    vocab: Vocabulary
    weights: list[np.ndarray]
    feature_dim: int


def initial_model(config: TrainJobConfig) -> InitialModel | None:
    """``scst.init_from`` loaded and checked against the config (model and text settings), or None.

    A bundle (a directory or URI holding ``bundle.json``, or a packaged model's name such as
    ``imgcap:flickr8k``; one model, not an ensemble) gives its model's weights; a local
    checkpoint, Ray run or output directory gives the best weights of its latest checkpoint.
    """
    source = config.scst.init_from
    if not (config.scst.enabled and source):
        return None
    fix = "point scst.init_from at a model bundle or a checkpoint, run or output directory of cross-entropy training"
    if is_bundle_reference(source):
        try:
            bundle = load_bundle(source)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"scst.init_from: cannot load the bundle {source}: {exc}; {fix}") from None
        if len(bundle.members) != 1:
            raise ConfigError(f"scst.init_from: {source} is an ensemble of {len(bundle.members)} models; "
                              f"self-critical training fine-tunes one model: {fix}")
        check_same_model(config, {"model": config_to_dict(bundle.model.config), "text": config_to_dict(bundle.text)},
                         f"scst.init_from ({source})")
        return InitialModel(source, bundle.vocab, bundle.model.get_weights(), bundle.model.feature_dim)
    checkpoint = find_latest_checkpoint(source) if Path(source).exists() else None
    if checkpoint is None:
        raise ConfigError(f"scst.init_from: {source} is neither a bundle (bundle.json) nor a directory holding "
                          f"an imgcap checkpoint ({CHECKPOINT_META}); {fix}")
    meta = read_checkpoint_meta(checkpoint)
    check_same_model(config, meta["job"], f"scst.init_from ({checkpoint})")
    vocab = Vocabulary.load(Path(checkpoint) / VOCAB_FILE)
    model = create_decoder(config.model, len(vocab), int(meta["feature_dim"]), int(meta.get("regions", 1)))
    return InitialModel(checkpoint, vocab, checkpoint_best_weights(checkpoint, model), int(meta["feature_dim"]))


def start_model(config: TrainJobConfig, data: TrainingData, start: InitialModel | None) -> Decoder:
    """The model a job trains: fresh, or with the weights of ``scst.init_from``."""
    if start is not None and start.feature_dim != data.features.dim:
        raise ConfigError(f"scst.init_from ({start.source}) was trained on {start.feature_dim}-d features but "
                          f"data.features has {data.features.dim}-d ones; use the features of the same backbone")
    model = build_model(config.model, data.vocab, data.features.dim, config.train.seed, data.regions)
    if start is not None:
        model.set_weights(start.weights)
    return model
