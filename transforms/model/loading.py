"""Finding and loading a model: the offline default, a local directory, gs://,
or a hub id; what its config says (`model_facts`); its weights, never partly
random (`load_pretrained`)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transforms.model.default_model import build_cached_dir, cache_root, default_model_dir
from transforms.model.device import torch_dtype
from transforms.uri import is_remote, strip_file_scheme

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
    model = strip_file_scheme(spec.model)
    if is_remote(model):
        return str(_copy_remote_dir(model))
    if os.path.isdir(model):
        return model
    if os.path.exists(model) or model.startswith((".", "/")):
        raise ModelLoadError(
            f"--model {model} is not a model directory (expected a folder with config.json)"
        )
    return model  # a hub id


def from_pretrained_kwargs(spec: ModelSpec, *, weights: bool = False) -> dict[str, Any]:
    """Keyword arguments of every `from_pretrained` call for this spec: configs,
    processors and tokenizers, and with `weights` the model itself (only
    safetensors unless `allow_pickle_weights`)."""
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if weights and not spec.allow_pickle_weights:
        kwargs["use_safetensors"] = True
    if spec.revision and not spec.is_default:
        kwargs["revision"] = spec.revision
    return kwargs


def explain_load_error(spec: ModelSpec, error: BaseException) -> ModelLoadError:
    """Wrap a `from_pretrained` failure in a message that says what to do."""
    text = f"{type(error).__name__}: {error}"
    hint = ""
    if not os.path.isdir(spec.model) and not is_remote(spec.model):
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


# ---- what a model is ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What the labeler needs to know of a model's config."""

    model_type: str
    zero_shot_only: bool  # a dual encoder (CLIP, SigLIP) without a classification head
    id2label: dict[int, str]
    config: Any = dataclasses.field(repr=False, compare=False, default=None)


@functools.lru_cache(maxsize=16)
def model_facts(spec: ModelSpec) -> ModelFacts:
    """Load the model's config (once per process) and describe it.

    Raises:
        ModelLoadError: the model cannot be found; the message says what to do.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(resolve_model(spec), **from_pretrained_kwargs(spec))
    except ModelLoadError:
        raise
    except Exception as e:
        raise explain_load_error(spec, e) from e
    model_type = str(config.model_type)
    architectures = list(getattr(config, "architectures", None) or [])
    classifier_names = set(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values())
    has_head = any(
        a in classifier_names or a.endswith("ForImageClassification") for a in architectures
    )
    dual = model_type in MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES or (
        hasattr(config, "text_config") and hasattr(config, "vision_config")
    )
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return ModelFacts(model_type, dual and not has_head, id2label, config)


# ---- loading weights: never a silently random model ---------------------------------


def _model_class(zero_shot: bool) -> Any:
    if zero_shot:
        from transformers import AutoModel

        return AutoModel
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification


def load_pretrained(spec: ModelSpec, *, zero_shot: bool, precision: str = "fp32") -> Any:
    """Load the model's weights, refusing any that transformers would initialize.

    transformers fills weights missing from a checkpoint with random values and
    only logs it (a CLIP checkpoint loaded as a classifier gets a random head;
    a base model gets a random `classifier.*`). Labels from such a model are
    noise, so a missing weight is an error that names it.

    Raises:
        ModelLoadError: the model cannot be loaded, or weights are missing.
    """
    try:
        model, info = _model_class(zero_shot).from_pretrained(
            resolve_model(spec),
            dtype=torch_dtype(precision),
            output_loading_info=True,
            **from_pretrained_kwargs(spec, weights=True),
        )
    except ModelLoadError:
        raise
    except Exception as e:
        raise explain_load_error(spec, e) from e
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(
        str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or ()
    )
    if missing or mismatched:
        names = missing + mismatched
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        hint = (
            "; for a CLIP/SigLIP checkpoint use --task zero-shot-image-classification with "
            "--candidate-labels"
            if not zero_shot and any(n.startswith("classifier") for n in names)
            else ""
        )
        raise ModelLoadError(
            f"model {spec.model!r} lacks weights that transformers would initialize at "
            f"random ({shown}), so its labels would be noise{hint}"
        )
    return model
