"""Config tables of the Ray Data jobs: extraction and captioning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from imgcap.config.loader import CaptionFormat, IdFrom, require
from imgcap.config.model import DecodeConfig
from imgcap.pretrained import DEFAULT_BUNDLE
from imgcap.vision.backbones import BACKBONES


@dataclass(frozen=True)
class ActorPoolConfig:
    """A Ray Data actor pool: `actors` at start, growing to `max_actors` (0: fixed) while work waits. The job
    tables that run a pool inherit these four keys (`ExtractConfig`, `CnnConfig`, `CaptionJobConfig`)."""
    actors: int = 1
    max_actors: int = 0  # > actors: the pool autoscales between actors and max_actors
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # requested whenever > 0 (so autoscalers add GPU nodes); 0: CPU only

    def __post_init__(self) -> None:
        require(self.actors >= 1, f"actors must be >= 1, got {self.actors}")
        require(self.max_actors == 0 or self.max_actors >= self.actors,
                f"max_actors must be 0 (a fixed pool) or >= actors = {self.actors}, got {self.max_actors}")
        require(self.cpus_per_actor >= 0, f"cpus_per_actor must be >= 0, got {self.cpus_per_actor}")
        require(self.gpus_per_actor >= 0, f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")

    @property
    def pool(self) -> ActorPoolConfig:
        """The pool's keys alone (what `imgcap.batch.actors` takes)."""
        return ActorPoolConfig(self.actors, self.max_actors, self.cpus_per_actor, self.gpus_per_actor)


def check_image_input(extensions: list[str], max_pixels: int, shard_size: int, rows_per_file: int) -> None:
    """The checks of the image-input and output keys that extraction and the captioning job share."""
    require(len(extensions) > 0 and all(e.startswith(".") for e in extensions),
            f"extensions must be a non-empty list like [\".jpg\", \".png\"], got {extensions}")
    require(max_pixels > 0, f"max_pixels must be > 0, got {max_pixels}")
    require(shard_size >= 1, f"shard_size must be >= 1, got {shard_size}")
    require(rows_per_file >= 1, f"rows_per_file must be >= 1, got {rows_per_file}")


@dataclass(frozen=True)
class SourceConfig:
    """One image source: a directory, list file, archive or s3:// URI (see imgcap.io.sources)."""
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
    # exponential backoff with jitter); beyond them a shard is read again in its task, a listing fails
    max_attempts: int = 10

    def __post_init__(self) -> None:
        require(self.max_attempts >= 1, f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(ActorPoolConfig):
    """Config of jobs/extract_features.py: images -> CNN features in Parquet (see imgcap.batch.extract)."""
    sources: list[SourceConfig]
    output_dir: str = "runs/features"  # Parquet directory or URI (s3://...); a rerun skips images already there
    backbone: str = "mobilenet_v2"  # one of imgcap.vision.backbones.BACKBONES
    weights: Literal["imagenet", "none"] = "imagenet"  # "none": random init (tests only)
    weights_file: str | None = None  # a local weights file (Keras .h5, or .pth for efficientnet_lite*): wins
    pooling: Literal["default", "avg", "max", "none"] = "default"  # "none": the whole grid (attention)
    feature_dtype: Literal["float32", "float16"] = "float32"  # float16 halves grids on disk and in training
    extensions: list[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp",
                                                           ".tif", ".tiff"])
    id_from: IdFrom = "stem"  # image id: file name without extension, path relative to the source, or the URI
    resize: Literal["stretch", "center_crop"] = "stretch"  # stretch = load_img(target_size), as the seeds
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "nearest"
    jpeg_draft: bool = False  # decode big JPEGs at reduced scale (faster; not bit-identical to load_img)
    max_pixels: int = 50_000_000  # larger images become error rows without being decoded
    batch_size: int = 32  # images per CNN forward pass
    shard_size: int = 64  # images per read/decode task
    rows_per_file: int = 5000  # Parquet rows per output file (bounds file size and the work lost to a kill)
    s3: S3Config = field(default_factory=S3Config)

    def __post_init__(self) -> None:
        require(len(self.sources) > 0, "sources must list at least one source, e.g. sources = [{path = \"images\"}]")
        require(bool(self.output_dir), "output_dir is required")

        require(self.backbone in BACKBONES,
               f"backbone must be one of {', '.join(sorted(BACKBONES))}; got {self.backbone!r}")
        require(not (self.weights == "none" and self.weights_file),
               "weights = \"none\" contradicts weights_file; remove one of them")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check_image_input(self.extensions, self.max_pixels, self.shard_size, self.rows_per_file)
        super().__post_init__()  # the pool of CNN actors (one model load each)


@dataclass(frozen=True, kw_only=True)
class CnnConfig(ActorPoolConfig):
    """The captioner actors of the images -> captions job (each holds the CNN and the caption decoder): the
    CNN's weights and the pool (backbone, pooling and imaging come from the bundle, so photos are embedded as
    its training features were)."""
    weights: Literal["imagenet", "none"] = "imagenet"
    weights_file: str | None = None  # a local weights file (Keras .h5, or .pth for efficientnet_lite*): wins
    batch_size: int = 32  # images per CNN forward pass (and caption-decoding call)

    def __post_init__(self) -> None:
        require(not (self.weights == "none" and self.weights_file),
                "weights = \"none\" contradicts weights_file; remove one of them")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class CaptionJobConfig(ActorPoolConfig):
    """Config of jobs/caption.py: images (or a features table) -> captions in Parquet, plus BLEU reports and an
    HTML contact sheet where references exist (see imgcap.batch.caption)."""
    # a model bundle: a packaged model's name, a directory every node sees, or a URI (s3://...) each actor fetches
    bundle: str = DEFAULT_BUNDLE
    sources: list[SourceConfig] = field(default_factory=list)  # images, exactly as extraction takes them
    features: str = ""  # or: Parquet file/directory/URI written by extraction, or a .npz with ids and features
    output_dir: str = "runs/captions"  # local path or URI (s3://...); a rerun skips images already captioned
    references: str | None = None  # a caption file; when set, captions are scored against it
    references_format: CaptionFormat = "auto"
    split: str | None = None  # a split file: caption only the images it lists
    decode: DecodeConfig | None = None  # default: the decoding recorded in the bundle
    # features input: the pool keys (actors, ...) are the caption actors' (one bundle load each); images
    # input: [cnn] is the pool, CNN + decoder in each actor
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
        require(bool(self.bundle), f"bundle is empty: leave it out for the default model ({DEFAULT_BUNDLE}) or give "
                "a bundle directory, URI or packaged model name")
        require(bool(self.sources) != bool(self.features),
                "give either sources (images: directories, list files, archives, s3:// URIs) or features "
                "(a features table), not both" if self.sources else
                "sources or features is required: the images to caption, or their features table")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        super().__post_init__()
        check_image_input(self.extensions, self.max_pixels, self.shard_size, self.rows_per_file)
        require(self.thumbnail_size >= 0, f"thumbnail_size must be >= 0, got {self.thumbnail_size}")
        require(self.html_max_rows >= 2, f"html_max_rows must be >= 2, got {self.html_max_rows}")
