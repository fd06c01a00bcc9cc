"""Model bundles: everything needed to caption identically anywhere.

A bundle is a directory with

- ``bundle.json``: format version, model / text / decoding config, feature dimension, the backbone that made
  the training features, and the training config and metrics that produced it;
- ``vocab.json``: the vocabulary (words in id order and the text mode);
- ``model.weights.h5``: the decoder weights.

Loading rebuilds the same `CaptionModel` from the recorded config and loads the weights, so captions from a
loaded bundle are identical to those of the model that was saved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgcap.beam import BeamSearchDecoder, GreedyDecoder, make_decoder
from imgcap.config import DecodeConfig, ModelConfig, TextConfig, config_from_dict, config_to_dict
from imgcap.model import CaptionModel
from imgcap.text import Vocabulary

BUNDLE_FORMAT = "imgcap-bundle/1"
_META, _VOCAB, _WEIGHTS = "bundle.json", "vocab.json", "model.weights.h5"


@dataclass
class CaptionBundle:
    """A trained caption decoder with its vocabulary and the configs that made it."""

    model: CaptionModel
    vocab: Vocabulary
    text: TextConfig
    decode: DecodeConfig
    backbone: str = ""  # the CNN that made the features this decoder was trained on
    provenance: dict[str, Any] = field(default_factory=dict)  # training config, metrics, data files
    _decoders: dict[DecodeConfig, GreedyDecoder | BeamSearchDecoder] = field(default_factory=dict, repr=False)

    def decoder(self, decode: DecodeConfig | None = None) -> GreedyDecoder | BeamSearchDecoder:
        """The decoder for `decode` (default: the bundle's), built once so its graph is traced once."""
        decode = decode or self.decode
        if decode not in self._decoders:
            self._decoders[decode] = make_decoder(self.model, decode)
        return self._decoders[decode]

    def caption(self, features: np.ndarray, decode: DecodeConfig | None = None) -> list[list[str]]:
        """Captions (as words) for a [N, D] feature matrix, with the bundle's or the given decoding."""
        return [self.vocab.decode(ids) for ids in self.decoder(decode).decode(features).tokens]

    def save(self, directory: str | Path) -> Path:
        """Write the bundle into `directory` (created if needed) and return it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": BUNDLE_FORMAT,
            "model": config_to_dict(self.model.config),
            "text": config_to_dict(self.text),
            "decode": config_to_dict(self.decode),
            "vocab_size": len(self.vocab),
            "feature_dim": self.model.feature_dim,
            "backbone": self.backbone,
            "provenance": self.provenance,
        }
        (directory / _META).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        self.vocab.save(directory / _VOCAB)
        self.model.save_weights(directory / _WEIGHTS)
        return directory


def load_bundle(directory: str | Path) -> CaptionBundle:
    """Load a bundle written by `CaptionBundle.save`; errors name the missing or mismatching part."""
    directory = Path(directory)
    for name in (_META, _VOCAB, _WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a model bundle: {name} is missing")
    meta = json.loads((directory / _META).read_text(encoding="utf-8"))
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{directory}: unsupported bundle format {meta.get('format')!r}, expected {BUNDLE_FORMAT}")
    vocab = Vocabulary.load(directory / _VOCAB)
    if len(vocab) != meta["vocab_size"]:
        raise ValueError(f"{directory}: vocab.json has {len(vocab)} words but the model was built for "
                         f"{meta['vocab_size']}")
    model = CaptionModel(config_from_dict(ModelConfig, meta["model"]), len(vocab), meta["feature_dim"])
    model.load_weights(directory / _WEIGHTS)
    return CaptionBundle(model, vocab, config_from_dict(TextConfig, meta["text"]),
                         config_from_dict(DecodeConfig, meta["decode"]), meta.get("backbone", ""),
                         meta.get("provenance", {}))
