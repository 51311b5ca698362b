"""From a checked `LabelingSpec` to the concrete one that runs, and what it says.

`resolve(spec)` probes the model, as HF's pipelines sort their parameters once
at the edge (`_sanitize_parameters`): it decides the task (a CLIP or SigLIP
checkpoint has no classification head, so candidate labels mean zero-shot),
reads the label file, loads the weights once to refuse a model that
transformers would partly initialize at random, and fixes the device a local
run will use. The result is a concrete spec: `task` set, labels inline,
`device` resolved where it can be. `metadata` and `model_labels` describe a
resolved spec for the output.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transforms.model.device import check_device_support, resolve_device
from transforms.model.label_set import LabelSet, LabelSetError, is_sigmoid_family
from transforms.model.loading import ModelLoadError, load_pretrained, model_facts
from transforms.model.postprocess import resolve_function
from transforms.models import NamedSpec
from transforms.options import ConfigError
from transforms.spec import IMAGE_CLASSIFICATION, ZERO_SHOT, LabelingSpec


def read_label_file(path: str) -> tuple[str, ...]:
    """One label per line (local or any fsspec URI); blank lines are skipped."""
    import fsspec

    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            return tuple(line.strip() for line in f if line.strip())
    except FileNotFoundError:
        raise ConfigError(f"--candidate-labels-file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--candidate-labels-file {path} is not UTF-8 text: {e}") from None


@dataclass(frozen=True)
class Resolved:
    """A resolved spec, with the weights that were loaded to check it (None
    when not checked). An in-process run hands them to its handler
    (`TorchHandlerBase.preload`), so the weights are read once."""

    spec: LabelingSpec
    weights: Any = dataclasses.field(default=None, repr=False, compare=False)


def resolve(spec: LabelingSpec, *, local: bool, check_weights: bool = True) -> LabelingSpec:
    """Check `spec` against its model and return the concrete spec that runs.

    Args:
        spec: a checked spec.
        local: the job runs on this machine, so "auto" becomes the device this
            machine has, and a device or precision it cannot run is refused
            now (exit 2) instead of on the workers.
        check_weights: load the weights once to refuse a model that
            transformers would partly initialize at random.

    Raises:
        ConfigError, ModelLoadError: with a message that says what to pass.

    Example::

        spec = resolve(LabelingSpec(model="path/to/model", top_k=3), local=True)
    """
    return resolve_loaded(spec, local=local, check_weights=check_weights).spec


def resolve_loaded(spec: LabelingSpec, *, local: bool, check_weights: bool = True) -> Resolved:
    """`resolve`, keeping the weights it loaded to check them."""
    facts = model_facts(spec.model_spec)
    has_labels = spec.candidate_labels is not None or spec.candidate_labels_file is not None
    task = spec.task
    if task is None:
        if facts.zero_shot_only:
            if not has_labels:
                raise ConfigError(
                    f"model {spec.model!r} ({facts.model_type}) is a zero-shot model with no "
                    "classification head: pass --candidate-labels 'a,b,c' (or "
                    "--candidate-labels-file FILE) to label images against your labels"
                )
            task = ZERO_SHOT
        else:
            task = IMAGE_CLASSIFICATION
            if has_labels:
                raise ConfigError(
                    f"--candidate-labels need a CLIP- or SigLIP-family model; {spec.model!r} "
                    f"({facts.model_type}) is an image classifier"
                )
    changes: dict[str, Any] = {"task": task}
    if task == ZERO_SHOT:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        )

        if facts.model_type not in MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES:
            raise ModelLoadError(
                f"model {spec.model!r} (model_type {facts.model_type!r}) has no image/text "
                "towers; zero-shot classification needs a CLIP- or SigLIP-family model"
            )
        if spec.candidate_labels_file is not None:
            labels = read_label_file(spec.candidate_labels_file)
            try:
                LabelSet(labels, spec.hypothesis_template)
            except LabelSetError as e:
                raise ConfigError(
                    f"--candidate-labels-file {spec.candidate_labels_file}: {e}"
                ) from None
            changes.update(candidate_labels=labels, candidate_labels_file=None)
    elif not facts.id2label:
        raise ModelLoadError(f"model {spec.model!r} has no id2label in its config")
    if local:
        device = resolve_device(spec.device)
        check_device_support(device, spec.precision, spec.quantize)
        changes["device"] = device
    resolved = dataclasses.replace(spec, **changes)
    weights = None
    if check_weights:
        weights = load_pretrained(
            resolved.model_spec, zero_shot=task == ZERO_SHOT, precision=resolved.precision
        )
    return Resolved(resolved, weights)


def model_labels(spec: LabelingSpec) -> list[str]:
    """Every label a resolved spec can give, in the model's order (candidate
    labels for zero-shot, `id2label` for a classifier)."""
    if spec.task == ZERO_SHOT:
        return list(spec.label_set.labels)
    id2label = model_facts(spec.model_spec).id2label
    return [id2label[i] for i in sorted(id2label)]


def metadata(spec: LabelingSpec) -> dict[str, str]:
    """Parquet key-value metadata that describes how a resolved spec labels."""
    from transforms import __version__
    from transforms.model.default_model import DEFAULT_MODEL_NAME

    facts = model_facts(spec.model_spec)
    name = f"default ({DEFAULT_MODEL_NAME})" if spec.model_spec.is_default else spec.model
    meta = {
        "image_labeler.version": __version__,
        "image_labeler.task": str(spec.task),
        "image_labeler.model": name,
        "image_labeler.revision": spec.revision or "",
        "image_labeler.top_k": str(spec.top_k),
        "image_labeler.decode": "fast" if spec.fast_decode else "exact",
    }
    if spec.threshold is not None:
        meta["image_labeler.threshold"] = repr(spec.threshold)
    if spec.embeddings:
        meta["image_labeler.embedding"] = (
            "image embedding (get_image_features), L2-normalized"
            if spec.task == ZERO_SHOT
            else "input of the classification head, L2-normalized"
        )
    if spec.task == ZERO_SHOT:
        label_set = spec.label_set
        meta.update(
            {
                "image_labeler.function_to_apply": "sigmoid"
                if is_sigmoid_family(facts.model_type)
                else "softmax",
                "image_labeler.num_labels": str(len(label_set.labels)),
                "image_labeler.label_count": str(len(label_set.labels)),
                "image_labeler.label_set_sha256": label_set.digest(),
                "image_labeler.hypothesis_templates": json.dumps(list(label_set.templates)),
            }
        )
    else:
        meta.update(
            {
                "image_labeler.function_to_apply": resolve_function(
                    spec.function_to_apply, facts.config
                ).value,
                "image_labeler.num_labels": str(len(facts.id2label)),
            }
        )
    return meta


#: The metadata of a pass rather than of one of its models.
PASS_KEYS = ("image_labeler.version", "image_labeler.decode")
#: Where a several-model pass keeps model `<name>`'s metadata:
#: ``image_labeler.models.<name>.model`` and so on.
MODEL_KEY_PREFIX = "image_labeler.models."


def model_key(key: str, model: str | None) -> str:
    """The metadata key of `key` (``image_labeler.model``) for one model of a
    pass: itself for the single unnamed model."""
    if model is None:
        return key
    return f"{MODEL_KEY_PREFIX}{model}.{key.split('.', 1)[1]}"


def models_metadata(models: Sequence[NamedSpec]) -> dict[str, str]:
    """Parquet key-value metadata of a pass: `metadata` of its single model, or
    each model's under its name (`model_key`) and the pass's own keys once."""
    meta: dict[str, str] = {}
    for model in models:
        for key, value in metadata(model.spec).items():
            meta[key if key in PASS_KEYS else model_key(key, model.name)] = value
    return meta


def resolve_models(models: Sequence[NamedSpec], *, local: bool) -> list[tuple[NamedSpec, Any]]:
    """`resolve_loaded` each model of a pass: (resolved model, its checked weights).

    Raises:
        what `resolve_loaded` raises, the message naming the model of several.
    """
    resolved = []
    for model in models:
        try:
            done = resolve_loaded(model.spec, local=local)
        except (ConfigError, ModelLoadError) as e:
            if model.name is None:
                raise
            raise type(e)(f"model {model.name}: {e}") from None
        resolved.append((NamedSpec(model.name, done.spec), done.weights))
    return resolved
