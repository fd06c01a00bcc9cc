"""imgcap: distributed batch image captioning on Ray (docs/, README.md).

The Python API for notebooks and services is `imgcap.Captioner` (`imgcap.captioner`): load a model bundle once,
caption paths, bytes or pixel arrays, get each caption with its score or its error. It is imported on first
use, so ``import imgcap.<module>`` in a Ray worker does not load it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Caption", "Captioner"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from imgcap import captioner

        return getattr(captioner, name)
    raise AttributeError(f"module 'imgcap' has no attribute {name!r}")
