"""Finding a model: the offline default, a local directory, gs://, or a hub id."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transforms.default_model import build_cached_dir, cache_root, default_model_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded. The message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load.

    Attributes:
        model: "default", a local directory, a gs:// (or other fsspec) directory,
            or a Hugging Face model id.
        revision: hub revision (branch, tag or commit); only for hub ids.
        allow_pickle_weights: also load `.bin` (pickle) weights; off by default
            because unpickling runs arbitrary code.
    """

    model: str = DEFAULT_MODEL
    revision: str | None = None
    allow_pickle_weights: bool = False

    @property
    def is_default(self) -> bool:
        return self.model in (DEFAULT_MODEL, "")


def _is_remote_dir(model: str) -> bool:
    return "://" in model and not model.startswith("file://")


def _copy_remote_dir(uri: str) -> Path:
    """Copy a remote model directory once into the local cache."""
    import fsspec

    def copy(tmp: Path) -> None:
        fs, root = fsspec.core.url_to_fs(uri.rstrip("/"))
        if not fs.exists(root):
            raise ModelLoadError(f"model directory {uri} does not exist")
        fs.get(root + "/", str(tmp) + "/", recursive=True)
        if not (tmp / "config.json").exists():
            raise ModelLoadError(f"{uri} has no config.json; is it a transformers model dir?")

    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return build_cached_dir(cache_root() / "remote-models" / key, copy, ready="config.json")


def resolve_model(spec: ModelSpec) -> str:
    """A path or hub id that `from_pretrained` can load, fetching or converting once."""
    if spec.is_default:
        return str(default_model_dir())
    model = spec.model
    if model.startswith("file://"):
        model = model[len("file://") :]
    if _is_remote_dir(model):
        return str(_copy_remote_dir(model))
    if os.path.isdir(model):
        return model
    if os.path.exists(model) or model.startswith((".", "/")):
        raise ModelLoadError(
            f"--model {model} is not a model directory (expected a folder with config.json)"
        )
    return model  # a hub id


def from_pretrained_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """Keyword arguments shared by every `from_pretrained` call for this spec."""
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if not spec.allow_pickle_weights:
        kwargs["use_safetensors"] = True
    if spec.revision and not spec.is_default:
        kwargs["revision"] = spec.revision
    return kwargs


def explain_load_error(spec: ModelSpec, error: BaseException) -> ModelLoadError:
    """Wrap a `from_pretrained` failure in a message that says what to do."""
    text = f"{type(error).__name__}: {error}"
    hint = ""
    if not os.path.isdir(spec.model) and not _is_remote_dir(spec.model):
        hint = (
            f" --model {spec.model!r} was treated as a Hugging Face hub id. If this machine "
            "has no access to the hub, download the model elsewhere "
            "(`huggingface-cli download ID --local-dir DIR`) and pass --model DIR, "
            "or a gs:// copy of that directory."
        )
    if "safetensors" in text.lower() and not spec.allow_pickle_weights:
        hint += (
            " Only safetensors weights are loaded by default; pass --allow-pickle-weights "
            "to load .bin weights from a source you trust."
        )
    return ModelLoadError(f"cannot load model {spec.model!r}: {text}.{hint}")
