"""The embedding spec: which feature a photo gets (backbone, pooling, imaging), recorded with features and bundles."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgcap.vision.backbones import get_backbone
from imgcap.vision.imaging import ImagingOptions

if TYPE_CHECKING:
    pass


EMBEDDING_FILE = "_embedding.json"  # next to extraction's Parquet files; readers skip "_" names


@dataclass(frozen=True)
class EmbeddingSpec:
    """How a photo becomes a feature: backbone + pooling + the imaging options (see imgcap.vision.imaging)."""
    backbone: str
    pooling: str = "default"
    resize: str = "stretch"
    resample: str = "nearest"
    jpeg_draft: bool = False

    @property
    def tag(self) -> str:
        """The `backbone` column value: the name, plus the pooling when it is not the backbone's default."""
        return self.backbone if self.pooling == "default" else f"{self.backbone}/{self.pooling}"

    @classmethod
    def from_tag(cls, tag: str) -> "EmbeddingSpec":
        """The spec of a backbone tag (``mobilenet_v2`` or ``vgg16/avg``) with the default imaging, which is
        how features were made when nothing else was recorded (the seeds' load_img: stretch, nearest)."""
        name, _, pooling = tag.partition("/")
        return cls(name, pooling or "default")

    @property
    def regions(self) -> int:
        """Region features per image: the backbone's grid (h x w) for pooling "none", else 1 (one vector)."""
        if self.pooling != "none":
            return 1
        height, width = get_backbone(self.backbone).grid
        return height * width

    def imaging(self, max_pixels: int = ImagingOptions.max_pixels) -> ImagingOptions:
        """The imaging options for this backbone's input size (`max_pixels` is a safety cap, not a choice
        that changes features, so it is the job's and not recorded)."""
        return ImagingOptions(get_backbone(self.backbone).input_size, self.resize,  # type: ignore[arg-type]
                              self.resample, max_pixels, self.jpeg_draft)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EmbeddingSpec":
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def read_embedding(features: str | Path) -> EmbeddingSpec | None:
    """The spec extraction recorded next to a features directory (None for other tables, e.g. an .npz)."""
    recorded = Path(features) / EMBEDDING_FILE
    if not recorded.is_file():
        return None
    return EmbeddingSpec.from_dict(json.loads(recorded.read_text(encoding="utf-8")))
