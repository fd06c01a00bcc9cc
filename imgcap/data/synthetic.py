"""The embedded demo dataset: procedurally drawn scenes of coloured shapes, with varied captions.

Needs no download: `make_shapes_dataset` draws each scene with Pillow (one or two shapes of a colour, kind
and size at a position, on a plain background), saves it as a real JPEG file and writes five differently
phrased captions per image to a Kaggle-style ``captions.txt`` (``image,caption``; captions with commas are
quoted), and a train/dev split by `imgcap.data.captions.deterministic_split` to split files. The same seed always
gives the same files, so the demo and the tests are reproducible.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from imgcap.data.captions import deterministic_split, image_id

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "white": (245, 245, 245)}
BACKGROUNDS = {"black": (15, 15, 15), "grey": (120, 120, 120)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
             "middle": (0.5, 0.5)}
SIZES = {"small": 0.12, "big": 0.22}
_PLACE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "middle": "in the middle"}


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    size: str
    position: str

    def phrase(self, with_size: bool) -> str:
        size = f"{self.size} " if with_size else ""
        return f"{size}{self.colour} {self.kind}"


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, image_size: int, rng: random.Random) -> None:
    cx, cy = POSITIONS[shape.position]
    # A little jitter so no two images of the same description are pixel-identical.
    cx, cy = (cx + rng.uniform(-0.04, 0.04)) * image_size, (cy + rng.uniform(-0.04, 0.04)) * image_size
    r = SIZES[shape.size] * image_size
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape.kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _captions(shapes: list[Shape], background: str) -> list[str]:
    first = shapes[0]
    if len(shapes) == 1:
        a = first
        return [
            f"a {a.phrase(True)} {_PLACE[a.position]}",
            f"a {a.colour} {a.kind} {_PLACE[a.position]} of the picture",
            f"there is a {a.phrase(True)} on a {background} background",
            f"a {a.size} {a.kind} that is {a.colour}",
            f"one {a.colour} {a.kind} {_PLACE[a.position]}, on {background}",
        ]
    a, b = shapes
    return [
        f"a {a.phrase(False)} and a {b.phrase(False)}",
        f"a {a.phrase(True)} {_PLACE[a.position]} and a {b.phrase(True)} {_PLACE[b.position]}",
        f"two shapes, a {a.colour} {a.kind} and a {b.colour} {b.kind}",
        f"a {b.phrase(False)} next to a {a.phrase(False)} on a {background} background",
        f"there is a {a.colour} {a.kind} {_PLACE[a.position]} and a {b.colour} {b.kind}",
    ]


@dataclass(frozen=True)
class DemoDataset:
    """Where `make_shapes_dataset` put the images, the captions and the train/dev split files."""

    images: Path
    captions: Path
    train_split: Path
    dev_split: Path


def demo_dataset_paths(out_dir: str | Path) -> DemoDataset:
    """The paths `make_shapes_dataset(out_dir)` writes (known before anything is generated)."""
    out_dir = Path(out_dir)
    return DemoDataset(out_dir / "images", out_dir / "captions.txt", out_dir / "train_images.txt",
                       out_dir / "dev_images.txt")


def make_shapes_dataset(out_dir: str | Path, num_images: int = 600, image_size: int = 224, seed: int = 0,
                        dev_fraction: float = 0.2) -> DemoDataset:
    """Write `num_images` JPEG scenes, their captions and a deterministic train/dev split into `out_dir`.

    Existing files of the same names are overwritten.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    paths = demo_dataset_paths(out_dir)
    images = paths.images
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for n in range(num_images):
        background = rng.choice(list(BACKGROUNDS))
        positions = rng.sample(list(POSITIONS), k=rng.choice((1, 2)))
        shapes = [Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES)), p)
                  for p in positions]
        image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
        draw = ImageDraw.Draw(image)
        for shape in shapes:
            _draw(draw, shape, image_size, rng)
        name = f"shapes_{n:05d}.jpg"
        image.save(images / name, quality=90)
        rows.extend((name, caption) for caption in _captions(shapes, background))
    with paths.captions.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    train, dev = deterministic_split((image_id(name) for name, _ in rows), dev_fraction)
    paths.train_split.write_text("".join(f"{i}.jpg\n" for i in train), encoding="utf-8")
    paths.dev_split.write_text("".join(f"{i}.jpg\n" for i in dev), encoding="utf-8")
    return paths


