"""The main job: images -> features -> trained decoder -> captions and BLEU, on Ray.

One config (see configs/demo.toml) drives the four stages, each the same code its own job runs:

1. data: with ``demo_images > 0``, the embedded demo dataset is drawn into ``work_dir/data`` (no download);
   otherwise ``images``, ``captions`` and the split files name real data;
2. features: `imgcap.batch.extract.extract_features` (Ray Data, CNN actor pool) -> ``work_dir/features``;
3. training: Ray Train trains the decoder data-parallel on the train split -> ``work_dir/train/bundle``;
4. captions: the bulk captioning job, `imgcap.batch.caption.run_caption_job`, captions the dev split's images
   (read, CNN and decoder on Ray Data, as the bundle records) -> ``work_dir/captions`` with the BLEU report
   and the HTML contact sheet.

Paths that connect the stages are filled in by the pipeline; every stage config is validated when the
pipeline config is loaded, before any stage runs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcap.batch.caption import CaptionJobResult, captions_directory, run_caption_job
from imgcap.batch.extract import ExtractionSummary, extract_features
from imgcap.config.jobs import CaptionJobConfig, ExtractConfig
from imgcap.config.loader import (
    ConfigError,
    config_from_dict,
    read_config_table,
    require,
)
from imgcap.config.training import TrainJobConfig
from imgcap.data.synthetic import demo_dataset_paths, make_shapes_dataset
from imgcap.io.storage import S3Options
from imgcap.train.ray_job import DistributedTrainResult, train_on_ray
from imgcap.vision.spec import EmbeddingSpec


@dataclass(frozen=True)
class PipelineConfig:
    """The main job's config: where to work, which data, and the three stage configs."""

    work_dir: Path
    demo_images: int  # > 0: draw the embedded demo dataset of this many images
    demo_seed: int
    extract: ExtractConfig
    train: TrainJobConfig
    caption: CaptionJobConfig


_TOP_KEYS = {"work_dir", "demo_images", "demo_seed", "images", "captions", "train_split", "dev_split",
             "extract", "train", "caption"}


def _stage_config(stage: str, cls: type, table: dict[str, Any], base: Path) -> Any:
    """A stage's config from its table; errors name the key from the pipeline file's top (``train.train.x``)."""
    try:
        return config_from_dict(cls, table, base)
    except ConfigError as exc:
        raise ConfigError(f"{stage}.{exc}") from None


def load_pipeline_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline TOML file, connect the stages' paths and validate every stage config."""
    path = Path(path)
    table = read_config_table(path, overrides)
    try:
        unknown = sorted(set(table) - _TOP_KEYS)
        require(not unknown, f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(_TOP_KEYS))}")
        base = path.parent.resolve()
        work_dir = (base / table.get("work_dir", "runs/pipeline")).resolve()
        demo_images = table.get("demo_images", 0)
        require(isinstance(demo_images, int) and demo_images >= 0, "demo_images must be an integer >= 0")
        if demo_images:
            demo = demo_dataset_paths(work_dir / "data")
            images, captions, train_split, dev_split = map(str, (demo.images, demo.captions, demo.train_split,
                                                                 demo.dev_split))
        else:
            missing = [k for k in ("images", "captions") if not table.get(k)]
            require(not missing, f"{' and '.join(missing)} required (or demo_images > 0 for the demo data)")
            images, captions = table["images"], str((base / table["captions"]).resolve())
            train_split = str((base / table["train_split"]).resolve()) if table.get("train_split") else None
            dev_split = str((base / table["dev_split"]).resolve()) if table.get("dev_split") else None
        features = str(work_dir / "features")
        extract = copy.deepcopy(table.get("extract", {}))
        extract.update(sources=[{"path": images}], output_dir=features)
        train = copy.deepcopy(table.get("train", {}))
        train.setdefault("data", {}).update(captions=captions, features=features, train_split=train_split,
                                            dev_split=dev_split, backbone=EmbeddingSpec(
                                                extract.get("backbone", "mobilenet_v2"),
                                                extract.get("pooling", "default")).tag)
        train["output_dir"] = str(work_dir / "train")
        train_config = _stage_config("train", TrainJobConfig, train, base)
        caption = copy.deepcopy(table.get("caption", {}))
        caption.update(bundle=train_config.bundle_path, sources=[{"path": images}], references=captions,
                       split=dev_split, output_dir=str(work_dir / "captions"))
        cnn = caption.setdefault("cnn", {})  # the CNN weights extraction used (the bundle names the backbone)
        for key in ("weights", "weights_file"):
            if key in extract:
                cnn.setdefault(key, extract[key])
        return PipelineConfig(
            work_dir=work_dir, demo_images=demo_images, demo_seed=int(table.get("demo_seed", 0)),
            extract=_stage_config("extract", ExtractConfig, extract, base),
            train=train_config,
            caption=_stage_config("caption", CaptionJobConfig, caption, base),
        )
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class PipelineResult:
    extraction: ExtractionSummary
    training: DistributedTrainResult
    captions: CaptionJobResult
    seconds: float

    def format(self) -> str:
        return "\n\n".join([self.extraction.format(), self.training.format(), self.captions.format(),
                            f"pipeline finished in {self.seconds:.1f} s"])


def run_pipeline(config: PipelineConfig) -> PipelineResult:
    """Run the four stages in order (Ray must be initialised, or a local Ray is started)."""
    started = time.perf_counter()
    if config.demo_images and not Path(config.train.data.captions).is_file():
        make_shapes_dataset(config.work_dir / "data", config.demo_images, seed=config.demo_seed)
    extraction = extract_features(config.extract)
    training = train_on_ray(config.train)
    # Captions belong to the bundle just trained: those of an earlier run are replaced, not resumed.
    captions_directory(config.caption, S3Options.from_config(config.caption.s3)).clear()
    captions = run_caption_job(config.caption)
    return PipelineResult(extraction, training, captions, time.perf_counter() - started)
