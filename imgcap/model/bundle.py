"""Model bundles: everything needed to caption identically anywhere.

A bundle is a directory with

- ``bundle.json``: format version, text / decoding config, feature dimension, the embedding that made the
  training features (`imgcap.vision.spec.EmbeddingSpec`: backbone, pooling, resize, resample, JPEG draft, so
  new photos are embedded exactly as those features were), one entry per model (its `ModelConfig` and
  weights file) and the provenance: the training config and metrics that produced each model;
- ``vocab.json``: the vocabulary (words in id order and the text mode);
- ``model-<k>.weights.h5``: the weights of model k (float32; an exported bundle stores them compressed, or
  as float16, which Keras casts back to the model's float32 on load).

A bundle of one model captions with that model; a bundle of several (made by `combine_bundles` from
bundles trained on the same vocabulary) captions with their `CaptionEnsemble`. Loading rebuilds every model
from its recorded config and loads its weights, so a loaded bundle captions exactly as the saved one did.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.fs as pafs

from imgcap.config.loader import config_from_dict, config_to_dict
from imgcap.config.model import DecodeConfig, ModelConfig, TextConfig
from imgcap.data.text import Vocabulary
from imgcap.io.storage import S3Options, filesystem_for
from imgcap.model.beam import BeamSearchDecoder, GreedyDecoder, make_decoder
from imgcap.model.decoder import CaptionEnsemble, Decoder, create_decoder
from imgcap.pretrained import SCHEME, packaged_path
from imgcap.vision.spec import EmbeddingSpec

BUNDLE_FORMAT = "imgcap-bundle/1"
WeightsDtype = Literal["float32", "float16"]
_META, _VOCAB = "bundle.json", "vocab.json"


@dataclass
class CaptionBundle:
    """A trained caption decoder with its vocabulary and the configs that made it."""

    model: Decoder | CaptionEnsemble
    vocab: Vocabulary
    text: TextConfig
    decode: DecodeConfig
    embedding: EmbeddingSpec | None = None  # how the features this decoder was trained on were made
    provenance: dict[str, Any] = field(default_factory=dict)  # training config and metrics (per member)
    fingerprint: str = ""  # sha256 of the saved files (set by save/load): names this exact bundle in outputs
    _decoders: dict[DecodeConfig, GreedyDecoder | BeamSearchDecoder] = field(default_factory=dict, repr=False)

    @property
    def backbone(self) -> str:
        """The backbone tag of the training features ("" when unknown)."""
        return self.embedding.tag if self.embedding else ""

    def decoder(self, decode: DecodeConfig | None = None) -> GreedyDecoder | BeamSearchDecoder:
        """The decoder for `decode` (default: the bundle's), built once so its graph is traced once."""
        decode = decode or self.decode
        if decode not in self._decoders:
            self._decoders[decode] = make_decoder(self.model, decode)
        return self._decoders[decode]

    def caption(self, features: np.ndarray, decode: DecodeConfig | None = None) -> list[list[str]]:
        """Captions (as words) for a [N, D] feature matrix, with the bundle's or the given decoding."""
        return [self.vocab.decode(ids) for ids in self.decoder(decode).decode(features).tokens]

    def save(self, directory: str | Path, weights_dtype: WeightsDtype | None = None) -> Path:
        """Write the bundle into `directory` (created if needed) and return it. With `weights_dtype` the weights
        are stored compressed, as float32 (lossless) or float16 (half the size again: check that its captions
        are unchanged before shipping it); without, as Keras writes them (training does, every epoch)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        models = [{"config": config_to_dict(m.config), "weights": f"model-{k}.weights.h5"}
                  for k, m in enumerate(self.members)]
        meta = {
            "format": BUNDLE_FORMAT,
            "models": models,
            "text": config_to_dict(self.text),
            "decode": config_to_dict(self.decode),
            "vocab_size": len(self.vocab),
            "feature_dim": self.model.feature_dim,
            "regions": self.model.regions,
            "backbone": self.backbone,
            "embedding": self.embedding.to_dict() if self.embedding else None,
            "weights_dtype": weights_dtype or "float32",
            "provenance": self.provenance,
        }
        for model, entry in zip(self.members, models):
            model.save_weights(directory / entry["weights"])
            if weights_dtype:
                _compact_weights(directory / entry["weights"], weights_dtype)
        self.vocab.save(directory / _VOCAB)
        (directory / _META).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        self.fingerprint = bundle_fingerprint(directory, [_META, _VOCAB, *(m["weights"] for m in models)])
        return directory

    @property
    def members(self) -> list[Decoder]:
        """The models of the bundle (one, or the members of its ensemble)."""
        return self.model.members if isinstance(self.model, CaptionEnsemble) else [self.model]


def _compact_weights(weights_file: Path, dtype: WeightsDtype) -> None:
    """Rewrite a Keras weights file losslessly compressed (gzip with byte shuffling, which h5py reads
    transparently: ~15% smaller for float32), its float32 arrays cast to `dtype`. Keras has no option for
    either, and its loader casts float16 back to the variables' float32 on assignment. The file is copied, not
    edited in place: HDF5 does not give back the space of a replaced array."""
    import h5py  # Keras' own dependency for .weights.h5 files

    def copy(source: h5py.Group, target: h5py.Group) -> None:
        target.attrs.update(source.attrs)
        for name, item in source.items():
            if isinstance(item, h5py.Group):
                copy(item, target.create_group(name))
                continue
            values = item[()]
            if values.dtype == np.float32:
                values = values.astype(dtype)
            # Small arrays stay contiguous: a compressed (chunked) array costs more bookkeeping than it saves.
            compress = {"compression": "gzip", "compression_opts": 9, "shuffle": True} if values.nbytes >= 2 ** 16 else {}
            target.create_dataset(name, data=values, **compress).attrs.update(item.attrs)

    compact = weights_file.with_suffix(".compact.tmp")
    with h5py.File(weights_file, "r") as source, h5py.File(compact, "w") as target:
        copy(source, target)
    compact.replace(weights_file)


def update_provenance(directory: str | Path, **entries: Any) -> None:
    """Add `entries` to the provenance of the bundle saved in `directory`: its bundle.json is rewritten, its
    weights are not (so a check of the saved weights can be recorded without writing them again)."""
    path = Path(directory) / _META
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["provenance"] = {**meta.get("provenance", {}), **entries}
    path.write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")


def is_bundle_reference(source: str) -> bool:
    """Whether `source` names a bundle: a packaged model (``imgcap:<name>``), a URI, or a directory holding
    bundle.json (rather than, say, a checkpoint or run directory)."""
    return source.startswith(SCHEME) or "://" in source or (Path(source) / _META).is_file()


def bundle_directory(bundle_path: str | Path, s3: S3Options | None = None) -> Path:
    """The local directory of a bundle: a packaged model (``imgcap:<name>``), a copy of one at a URI
    (``s3://...``, fetched once per process with `s3`'s options), or the directory given."""
    if str(bundle_path).startswith(SCHEME):
        return packaged_path(str(bundle_path))
    return fetch_bundle(str(bundle_path), s3 or S3Options()) if "://" in str(bundle_path) else Path(bundle_path)


def load_bundle(bundle_path: str | Path, s3: S3Options | None = None) -> CaptionBundle:
    """Load a bundle written by `CaptionBundle.save`, by name (``imgcap:flickr8k``), directory or URI (see
    `bundle_directory`); errors name the missing or mismatching part."""
    directory = bundle_directory(bundle_path, s3)
    for name in (_META, _VOCAB):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a model bundle: {name} is missing")
    meta = json.loads((directory / _META).read_text(encoding="utf-8"))
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{directory}: unsupported bundle format {meta.get('format')!r}, expected {BUNDLE_FORMAT}")
    vocab = Vocabulary.load(directory / _VOCAB)
    if len(vocab) != meta["vocab_size"]:
        raise ValueError(f"{directory}: vocab.json has {len(vocab)} words but the model was built for "
                         f"{meta['vocab_size']}")
    members = []
    for entry in meta["models"]:
        if not (directory / entry["weights"]).is_file():
            raise FileNotFoundError(f"{directory} is not a complete bundle: {entry['weights']} is missing")
        model = create_decoder(config_from_dict(ModelConfig, entry["config"]), len(vocab), meta["feature_dim"],
                               meta.get("regions", 1))  # bundles before attention: feature vectors
        model.load_weights(directory / entry["weights"])
        members.append(model)
    model = members[0] if len(members) == 1 else CaptionEnsemble(members)
    # Bundles written before the embedding was recorded name only the backbone; their features were made
    # with the extraction defaults, which is what from_tag assumes.
    embedding = (EmbeddingSpec.from_dict(meta["embedding"]) if meta.get("embedding")
                 else EmbeddingSpec.from_tag(meta["backbone"]) if meta.get("backbone") else None)
    files = [_META, _VOCAB, *(entry["weights"] for entry in meta["models"])]
    return CaptionBundle(model, vocab, config_from_dict(TextConfig, meta["text"]),
                         config_from_dict(DecodeConfig, meta["decode"]), embedding, meta.get("provenance", {}),
                         bundle_fingerprint(directory, files))


@functools.lru_cache(maxsize=8)
def fetch_bundle(bundle_path: str, s3: S3Options) -> Path:
    """A local copy of the bundle at a URI (every caption actor of a cluster job fetches its own, so the bundle
    needs no shared filesystem); kept for the life of the process."""
    filesystem, path = filesystem_for(bundle_path, s3)
    if filesystem.get_file_info(f"{path}/{_META}").type != pafs.FileType.File:
        raise FileNotFoundError(f"{bundle_path} is not a model bundle: {_META} is missing")
    local = Path(tempfile.mkdtemp(prefix="imgcap-bundle-"))
    pafs.copy_files(path, str(local), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
    return local


def bundle_fingerprint(directory: Path, files: list[str]) -> str:
    """``sha256:<16 hex>`` of a bundle's files: the same bundle anywhere (copied, uploaded with a job's working
    dir) has the same fingerprint, so resumed outputs can tell it from another model."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode("utf-8"))
        digest.update((directory / name).read_bytes())
    return f"sha256:{digest.hexdigest()[:16]}"


def combine_bundles(bundles: list[CaptionBundle], decode: DecodeConfig | None = None) -> CaptionBundle:
    """One bundle that captions with the ensemble of `bundles`' models.

    The bundles must share the vocabulary, text normalisation and embedding (bundles trained on the same
    data and text config do); their models may differ (e.g. merge and inject). Decoding defaults to the
    first bundle's. The provenance keeps each member's.
    """
    if not bundles:
        raise ValueError("nothing to combine: no bundles given")
    first = bundles[0]
    for k, other in enumerate(bundles[1:], 1):
        if other.vocab != first.vocab:
            raise ValueError(f"bundle {k} has another vocabulary than bundle 0: train both on the same data "
                             "and text config")
        if (other.text, other.embedding) != (first.text, first.embedding):
            raise ValueError(f"bundle {k} differs from bundle 0 in text config or embedding (backbone, imaging)")
    members = [m for b in bundles for m in b.members]
    provenance = {"members": [b.provenance for b in bundles]}
    return CaptionBundle(CaptionEnsemble(members), first.vocab, first.text, decode or first.decode, first.embedding,
                         provenance)
