"""Reusable DoFns, PTransforms and ModelHandlers for batch image labeling.

`LabelImages` (a Beam PTransform) and `classify` (no Beam) are the public API;
they are imported lazily so that light modules (errors, fetch, decode) do not
pull in Beam and torch.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["LabelImages", "LabelingSpec", "classify", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("LabelImages", "LabelingSpec", "classify"):
        from transforms import api

        return getattr(api, name)
    raise AttributeError(f"module 'transforms' has no attribute {name!r}")
