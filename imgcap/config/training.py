"""Config tables of the training jobs (imgcap train, jobs/train.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from imgcap.config.loader import require
from imgcap.config.model import DecodeConfig, ModelConfig, TextConfig


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the caption decoder (see imgcap.train.loop)."""

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
    """Self-critical sequence training (imgcap.train.scst): a second phase that fine-tunes on the CIDEr-D reward of
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
    # learned faster and collapsed sooner (docs/quality.md, "Self-critical training").
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
    """How jobs/train.py runs on Ray Train (see imgcap.train.ray_job); unused by single-process training."""

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


BUNDLE_DIR = "bundle"  # the bundle's folder in a training job's output_dir


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

    @property
    def bundle_path(self) -> str:
        """Where the job writes the bundle of its best epoch: ``<output_dir>/bundle``."""
        return f"{self.output_dir.rstrip('/')}/{BUNDLE_DIR}"
