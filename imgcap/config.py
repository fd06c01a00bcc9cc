"""Declarative job configuration: TOML files loaded into typed, validated dataclasses.

Every job reads one TOML file whose tables map onto the dataclasses below. Loading rejects unknown keys,
wrong types and out-of-range values with a message naming the file, the key and what to change, so a bad
config fails before any data is read or any Ray worker starts.

Relative paths in a config are resolved against the directory of the config file, so a config can be run
from anywhere.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar


IdFrom = Literal["stem", "relpath", "uri"]
CaptionFormat = Literal["auto", "flickr8k", "csv", "coco", "karpathy"]


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message says which key and how to fix it."""


T = TypeVar("T")


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class TextConfig:
    """How captions are normalised and which words enter the vocabulary."""

    mode: Literal["standard", "seed"] = "standard"
    min_count: int = 5
    max_length: int = 40  # tokens, including <start>/<end>; longer captions are truncated

    def __post_init__(self) -> None:
        require(self.min_count >= 1, f"min_count must be >= 1, got {self.min_count}")
        require(self.max_length >= 3, f"max_length must be >= 3, got {self.max_length}")


@dataclass(frozen=True)
class ModelConfig:
    """The caption decoder (see imgcap.model)."""

    architecture: Literal["merge", "inject"] = "merge"
    embedding_dim: int = 256
    units: int = 256
    dropout: float = 0.5
    embedding_dropout: float = 0.0
    glove_path: str | None = None  # GloVe text file; its dimension must equal embedding_dim
    glove_trainable: bool = True

    def __post_init__(self) -> None:
        require(self.embedding_dim > 0 and self.units > 0, "embedding_dim and units must be > 0")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        require(0.0 <= self.embedding_dropout < 1.0, "embedding_dropout must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the caption decoder (see imgcap.train)."""

    epochs: int = 10
    batch_size: int = 64  # captions per step (global batch, over all workers)
    learning_rate: float = 1e-3
    lr_decay: float = 1.0  # learning rate multiplied by this after every epoch
    label_smoothing: float = 0.0
    # > 0: train on a sampled softmax with this many negative words per step instead of the whole vocabulary
    # (dev loss, dev BLEU and decoding always use the full softmax). Pays off for large vocabularies.
    sampled_softmax: int = 0
    # > 0: keep an exponential moving average of the weights with this decay per step (e.g. 0.998); the average
    # is what is evaluated on dev, selected and saved. 0: the weights as trained.
    weight_ema: float = 0.0
    clip_norm: float = 5.0
    select_by: Literal["bleu", "cider", "loss"] = "bleu"  # best epoch: greedy dev BLEU-4, dev CIDEr-D, or dev loss
    patience: int = 3  # stop after this many epochs without a better dev score (0: never stop early)
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        require(0 < self.lr_decay <= 1, f"lr_decay must be in (0, 1], got {self.lr_decay}")
        require(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        require(0 <= self.weight_ema < 1, f"weight_ema must be in [0, 1), got {self.weight_ema}")
        require(self.sampled_softmax >= 0, f"sampled_softmax must be >= 0, got {self.sampled_softmax}")
        require(not (self.sampled_softmax and self.label_smoothing),
                "sampled_softmax and label_smoothing cannot be combined (smoothing needs the whole vocabulary)")
        require(self.clip_norm > 0, "clip_norm must be > 0")
        require(self.patience >= 0, "patience must be >= 0")


@dataclass(frozen=True)
class ScstConfig:
    """Self-critical sequence training (imgcap.scst): a second phase that fine-tunes on the CIDEr-D reward of
    the model's own sampled captions. Off by default."""

    enabled: bool = False
    # a bundle directory (or URI) or a checkpoint / run / output directory of cross-entropy training to start
    # from (the cross-entropy phase is then skipped); none: this job's own cross-entropy phase
    init_from: str | None = None
    epochs: int = 10
    samples: int = 5  # captions sampled per image and step
    temperature: float = 1.0  # of the sampling distribution
    baseline: Literal["mean", "greedy"] = "mean"  # mean reward of the image's other samples, or its greedy caption's
    max_length: int = 20  # tokens of a sampled caption, <end> included
    batch_size: int = 50  # images per step (global, over all workers); each brings `samples` captions
    learning_rate: float = 5e-5
    lr_decay: float = 1.0
    weight_ema: float = 0.0
    # The update scores the sampled captions with the model's dropout on (sampling runs without it): a
    # regulariser that measured better on dev than the exact gradient of the sampling policy (false), which
    # learned faster and collapsed sooner (README, "Self-critical training").
    dropout: bool = True
    select_by: Literal["bleu", "cider"] = "cider"  # best epoch: greedy dev CIDEr-D or BLEU-4
    patience: int = 3

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.samples >= 1, f"samples must be >= 1, got {self.samples}")
        require(self.samples >= 2 or self.baseline == "greedy",
                f"samples = {self.samples} with baseline = \"mean\": the mean of the other samples needs samples >= 2 "
                f"(or baseline = \"greedy\")")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        require(0 < self.lr_decay <= 1, f"lr_decay must be in (0, 1], got {self.lr_decay}")
        require(0 <= self.weight_ema < 1, f"weight_ema must be in [0, 1), got {self.weight_ema}")
        require(self.patience >= 0, "patience must be >= 0")

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The optimisation of the phase as a `TrainConfig`: `base` (clip norm, seed) with this table's values;
        no label smoothing and no sampled softmax (the policy gradient needs the log-probability of the sample)."""
        return dataclasses.replace(base, epochs=self.epochs, batch_size=self.batch_size,
                                   learning_rate=self.learning_rate, lr_decay=self.lr_decay,
                                   weight_ema=self.weight_ema, select_by=self.select_by, patience=self.patience,
                                   label_smoothing=0.0, sampled_softmax=0)


@dataclass(frozen=True)
class DecodeConfig:
    """Caption generation (see imgcap.beam)."""

    beam_width: int = 3  # 1 means greedy decoding
    length_penalty: float = 0.0  # score = log p / length**length_penalty (0: plain log-probability)
    max_length: int = 30
    batch_size: int = 256

    def __post_init__(self) -> None:
        require(self.beam_width >= 1, f"beam_width must be >= 1, got {self.beam_width}")
        require(self.length_penalty >= 0, "length_penalty must be >= 0")
        require(self.max_length >= 1, "max_length must be >= 1")
        require(self.batch_size >= 1, "batch_size must be >= 1")

    @property
    def label(self) -> str:
        """How captions were decoded, for reports: "greedy", "beam-3", "beam-5 (length penalty 0.7)"."""
        if self.beam_width == 1:
            return "greedy"
        penalty = f" (length penalty {self.length_penalty:g})" if self.length_penalty else ""
        return f"beam-{self.beam_width}{penalty}"


@dataclass(frozen=True)
class DataConfig:
    """Where captions, splits and image features come from."""

    captions: str = ""  # caption file: Flickr8k token / Kaggle csv / COCO json / Karpathy json
    captions_format: Literal["auto", "flickr8k", "csv", "coco", "karpathy"] = "auto"
    features: str = ""  # features file: .npz (ids, features) or a Parquet file/directory from extraction
    backbone: str = ""  # the CNN that made the features (recorded in the bundle for `imgcap caption`)
    train_split: str | None = None  # split files listing image names; none: deterministic split
    dev_split: str | None = None
    dev_fraction: float = 0.1  # used only when no split files are given
    max_train_images: int = 0  # 0: all
    max_dev_images: int = 0
    skip_malformed: bool = False  # count and skip malformed caption lines instead of failing

    def __post_init__(self) -> None:
        require(bool(self.captions), "captions is required: the caption file to train on")
        require(bool(self.features), "features is required: the .npz or Parquet features")
        require(0.0 < self.dev_fraction < 1.0, "dev_fraction must be in (0, 1)")
        require((self.train_split is None) == (self.dev_split is None),
               "train_split and dev_split go together: give both or neither")


@dataclass(frozen=True)
class RayTrainConfig:
    """How jobs/train.py runs on Ray Train (see imgcap.distributed); unused by single-process training."""

    num_workers: int = 2  # data-parallel workers; train.batch_size is the global batch, split over them
    use_gpu: bool = False  # one GPU per worker; the cluster must have num_workers GPUs (or an autoscaler add them)
    cpus_per_worker: int = 1  # Ray CPUs reserved per worker (also TensorFlow's intra-op threads)
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before the run fails
    # Where Ray Train keeps runs and checkpoints: a directory ("": <output_dir>/ray_results; shared storage on a
    # multi-node cluster) or a pyarrow filesystem URI (s3://bucket/prefix); checked writable before training.
    storage_path: str = ""
    storage_endpoint_url: str | None = None  # S3-compatible endpoint of an s3:// storage_path/resume_from (MinIO)
    # "": train-<output_dir name>-<8 hex of its path>, stable: rerunning the job continues its run (same config)
    run_name: str = ""
    checkpoints_to_keep: int = 2  # best checkpoints kept by train.select_by (the latest is always kept too)
    # a checkpoint, run or output directory (or URI) of another run: a NEW run starts from its latest epoch
    resume_from: str | None = None
    # autoscaling cluster short of CPUs/GPUs: seconds to wait for the autoscaler (0: refuse at once, as on a
    # fixed cluster, which is always refused at once)
    resource_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, f"num_workers must be >= 1, got {self.num_workers}")
        require(self.cpus_per_worker >= 1, f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        require(self.max_failures >= 0, f"max_failures must be >= 0 (-1 is not allowed), got {self.max_failures}")
        require(self.checkpoints_to_keep >= 1, f"checkpoints_to_keep must be >= 1, got {self.checkpoints_to_keep}")
        require(self.resource_timeout_s >= 0, f"resource_timeout_s must be >= 0, got {self.resource_timeout_s}")


@dataclass(frozen=True)
class TrainJobConfig:
    """Config of jobs/train.py: data + text + model + optimisation, and where the bundle goes."""

    data: DataConfig
    output_dir: str = "runs/train"
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)
    ray: RayTrainConfig = field(default_factory=RayTrainConfig)


_PATH_KEYS = {"captions", "features", "train_split", "dev_split", "glove_path", "output_dir",
              "path", "weights_file", "bundle", "references", "split", "storage_path", "resume_from", "init_from"}


def _coerce(value: Any, annotation: Any, where: str, base: Path) -> Any:
    """Check `value` against a (resolved) type annotation and convert nested tables to dataclasses."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        require(isinstance(value, dict), f"{where} must be a table, got {value!r}")
        return _build(annotation, value, where, base)
    if origin is Literal:
        choices = typing.get_args(annotation)
        require(value in choices, f"{where} must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [a for a in options if a is not type(None)]
        return _coerce(value, inner[0], where, base)
    if origin in (list, tuple):
        require(isinstance(value, list), f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1]
        return type(origin())(_coerce(v, item, f"{where}[{i}]", base) for i, v in enumerate(value))
    if annotation is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{where} must be an integer, got {value!r}")
        return value
    if annotation in (str, bool):
        require(isinstance(value, annotation), f"{where} must be a {annotation.__name__}, got {value!r}")
        return value
    return value


def _build(cls: type[T], table: dict[str, Any], where: str, base: Path) -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    require(not unknown, f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in table.items():
        key = f"{where}.{name}" if where else name
        value = _coerce(value, hints[name], key, base)
        if name in _PATH_KEYS and isinstance(value, str) and value and "://" not in value:
            value = str((base / value).resolve()) if not Path(value).is_absolute() else value
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required table or key is missing
        raise ConfigError(f"{where or 'config'}: {exc}") from None
    except ConfigError as exc:  # messages of __post_init__ name keys relative to their own table
        raise ConfigError(f"{where}.{exc}" if where else str(exc)) from None


def config_from_dict(cls: type[T], table: dict[str, Any], base_dir: str | Path = ".") -> T:
    """Build and validate a config dataclass from a plain dict (as parsed from TOML)."""
    return _build(cls, table, "", Path(base_dir).resolve())


def read_config_table(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TOML table of `path` with dotted-key `overrides` (e.g. {"train.epochs": 2}) applied."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        node = table
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), f"override {dotted!r}: {part!r} is a value, not a table")
        node[leaf] = value
    return table


def load_config(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Load `path` (TOML) into `cls`, applying dotted-key `overrides` (e.g. {"train.epochs": 2}) first."""
    table = read_config_table(path, overrides)
    try:
        return config_from_dict(cls, table, Path(path).parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (for recording in bundles and checkpoints)."""
    return dataclasses.asdict(config)


# --- feature extraction (jobs/extract_features.py)


@dataclass(frozen=True)
class ActorPoolConfig:
    """A Ray Data actor pool: `actors` at start, growing to `max_actors` (0: fixed) while work waits."""

    actors: int = 1
    max_actors: int = 0
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # requested whenever > 0 (so autoscalers add GPU nodes); 0: CPU only

    def __post_init__(self) -> None:
        check_pool(self)


def check_pool(pool: ActorPoolConfig) -> None:
    """The checks of an actor pool's keys, shared by the jobs that name them at their top level."""
    require(pool.actors >= 1, f"actors must be >= 1, got {pool.actors}")
    require(pool.max_actors == 0 or pool.max_actors >= pool.actors,
            f"max_actors must be 0 (a fixed pool) or >= actors = {pool.actors}, got {pool.max_actors}")
    require(pool.cpus_per_actor >= 0, f"cpus_per_actor must be >= 0, got {pool.cpus_per_actor}")
    require(pool.gpus_per_actor >= 0, f"gpus_per_actor must be >= 0, got {pool.gpus_per_actor}")


def check_image_input(extensions: list[str], max_pixels: int, shard_size: int, rows_per_file: int) -> None:
    """The checks of the image-input and output keys that extraction and the captioning job share."""
    require(len(extensions) > 0 and all(e.startswith(".") for e in extensions),
            f"extensions must be a non-empty list like [\".jpg\", \".png\"], got {extensions}")
    require(max_pixels > 0, f"max_pixels must be > 0, got {max_pixels}")
    require(shard_size >= 1, f"shard_size must be >= 1, got {shard_size}")
    require(rows_per_file >= 1, f"rows_per_file must be >= 1, got {rows_per_file}")


@dataclass(frozen=True)
class SourceConfig:
    """One image source: a directory, list file, archive or s3:// URI (see imgcap.sources)."""

    path: str
    recursive: bool = True  # directories and S3 prefixes: descend into subdirectories
    include_archives: bool = False  # directories and S3 prefixes: also read the archives found in them

    def __post_init__(self) -> None:
        require(bool(self.path), "path is required: a directory, list file, archive or s3:// URI")


@dataclass(frozen=True)
class S3Config:
    """S3 access; unset keys fall back to boto3's usual sources (AWS_* env, ~/.aws, instance role)."""

    endpoint_url: str | None = None  # S3-compatible stores (MinIO, Ceph); AWS_ENDPOINT_URL also works
    region: str | None = None
    profile: str | None = None  # a profile of ~/.aws/config; AWS_PROFILE also works
    anonymous: bool = False  # unsigned requests, for public buckets
    # attempts per S3 request (AWS SDK standard retries: 500/503/SlowDown/throttling and connection errors,
    # exponential backoff with jitter); beyond them a read task is retried whole, a listing fails
    max_attempts: int = 10

    def __post_init__(self) -> None:
        require(self.max_attempts >= 1, f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class ExtractConfig:
    """Config of jobs/extract_features.py: images -> CNN features in Parquet (see imgcap.extract_job)."""

    sources: list[SourceConfig]
    output_dir: str = "runs/features"  # Parquet directory or URI (s3://...); a rerun skips images already there
    backbone: str = "mobilenet_v2"  # one of imgcap.backbones.BACKBONES
    weights: Literal["imagenet", "none"] = "imagenet"  # "none": random init (tests only)
    weights_file: str | None = None  # a local Keras weights file; overrides `weights`
    pooling: Literal["default", "avg", "max", "none"] = "default"
    extensions: list[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp",
                                                           ".tif", ".tiff"])
    id_from: IdFrom = "stem"  # image id: file name without extension, path relative to the source, or the URI
    resize: Literal["stretch", "center_crop"] = "stretch"  # stretch = load_img(target_size), as the seeds
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "nearest"
    jpeg_draft: bool = False  # decode big JPEGs at reduced scale (faster; not bit-identical to load_img)
    max_pixels: int = 50_000_000  # larger images become error rows without being decoded
    batch_size: int = 32  # images per CNN forward pass
    shard_size: int = 64  # images per read/decode task
    actors: int = 1  # CNN actors (one model load each)
    max_actors: int = 0  # > actors: the pool autoscales between actors and max_actors
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # GPUs each CNN actor requests (autoscalers add GPU nodes for them); 0: CPU
    rows_per_file: int = 5000  # Parquet rows per output file (bounds file size and the work lost to a kill)
    s3: S3Config = field(default_factory=S3Config)

    def __post_init__(self) -> None:
        require(len(self.sources) > 0, "sources must list at least one source, e.g. sources = [{path = \"images\"}]")
        require(bool(self.output_dir), "output_dir is required")
        from imgcap.backbones import BACKBONES  # light: no TensorFlow import

        require(self.backbone in BACKBONES,
               f"backbone must be one of {', '.join(sorted(BACKBONES))}; got {self.backbone!r}")
        require(not (self.weights == "none" and self.weights_file),
               "weights = \"none\" contradicts weights_file; remove one of them")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check_image_input(self.extensions, self.max_pixels, self.shard_size, self.rows_per_file)
        check_pool(self.pool)

    @property
    def pool(self) -> ActorPoolConfig:
        """The CNN actor pool."""
        return ActorPoolConfig(self.actors, self.max_actors, self.cpus_per_actor, self.gpus_per_actor)


@dataclass(frozen=True)
class CnnConfig:
    """The captioner actors of the images -> captions job (each holds the CNN and the caption decoder): the
    CNN's weights and the pool (backbone, pooling and imaging come from the bundle, so photos are embedded as
    its training features were)."""

    weights: Literal["imagenet", "none"] = "imagenet"
    weights_file: str | None = None  # a local Keras weights file; overrides `weights`
    batch_size: int = 32  # images per CNN forward pass (and caption-decoding call)
    actors: int = 1
    max_actors: int = 0
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # requested whenever > 0 (so autoscalers add GPU nodes); 0: CPU only

    def __post_init__(self) -> None:
        require(not (self.weights == "none" and self.weights_file),
                "weights = \"none\" contradicts weights_file; remove one of them")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check_pool(self.pool)

    @property
    def pool(self) -> ActorPoolConfig:
        return ActorPoolConfig(self.actors, self.max_actors, self.cpus_per_actor, self.gpus_per_actor)


@dataclass(frozen=True)
class CaptionJobConfig:
    """Config of jobs/caption.py: images (or a features table) -> captions in Parquet, plus BLEU reports and an
    HTML contact sheet where references exist (see imgcap.caption_job)."""

    bundle: str  # a model bundle: a directory every node sees, or a URI (s3://...) each actor fetches
    sources: list[SourceConfig] = field(default_factory=list)  # images, exactly as extraction takes them
    features: str = ""  # or: Parquet file/directory/URI written by extraction, or a .npz with ids and features
    output_dir: str = "runs/captions"  # local path or URI (s3://...); a rerun skips images already captioned
    references: str | None = None  # a caption file; when set, captions are scored against it
    references_format: CaptionFormat = "auto"
    split: str | None = None  # a split file: caption only the images it lists
    decode: DecodeConfig | None = None  # default: the decoding recorded in the bundle
    # features input: the caption actor pool (images input: [cnn] is the pool, CNN + decoder in each actor)
    actors: int = 1  # caption actors (one bundle load each)
    max_actors: int = 0  # > actors: the caption pool autoscales up to this many
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_size: int = 256  # images per decoding batch
    coco: bool = True  # also score with the coco-caption scorers when pycocoevalcap is installed
    # images only:
    cnn: CnnConfig = field(default_factory=CnnConfig)
    extensions: list[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp",
                                                           ".tif", ".tiff"])
    id_from: IdFrom = "stem"
    max_pixels: int = 50_000_000
    shard_size: int = 64  # images per read task
    rows_per_file: int = 5000
    thumbnail_size: int = 96  # px of the contact sheet's thumbnails, kept in the captions Parquet (0: none)
    html_max_rows: int = 2000  # rows of the HTML contact sheet (best and worst halves beyond that)
    s3: S3Config = field(default_factory=S3Config)

    def __post_init__(self) -> None:
        require(bool(self.bundle), "bundle is required: the model bundle directory to caption with")
        require(bool(self.sources) != bool(self.features),
                "give either sources (images: directories, list files, archives, s3:// URIs) or features "
                "(a features table), not both" if self.sources else
                "sources or features is required: the images to caption, or their features table")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check_pool(self.pool)
        check_image_input(self.extensions, self.max_pixels, self.shard_size, self.rows_per_file)
        require(self.thumbnail_size >= 0, f"thumbnail_size must be >= 0, got {self.thumbnail_size}")
        require(self.html_max_rows >= 2, f"html_max_rows must be >= 2, got {self.html_max_rows}")

    @property
    def pool(self) -> ActorPoolConfig:
        """The caption actor pool."""
        return ActorPoolConfig(self.actors, self.max_actors, self.cpus_per_actor, self.gpus_per_actor)
