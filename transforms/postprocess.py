"""Scores and top-k labels with the exact semantics of transformers' pipelines."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

import numpy as np

from transforms.rows import Prediction


class ClassificationFunction(str, Enum):
    """`--function-to-apply` values, as in `ImageClassificationPipeline`."""

    DEFAULT = "default"
    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"
    NONE = "none"


def resolve_function(requested: str, config: Any) -> ClassificationFunction:
    """Resolve "default" from the model config, as `ImageClassificationPipeline` does.

    Regression models get no function; multi-label models and single-output
    models get sigmoid; other models get softmax.
    """
    function = ClassificationFunction(requested)
    if function is not ClassificationFunction.DEFAULT:
        return function
    problem_type = getattr(config, "problem_type", None)
    num_labels = int(config.num_labels)
    if problem_type == "regression":
        return ClassificationFunction.NONE
    if problem_type == "multi_label_classification" or num_labels == 1:
        return ClassificationFunction.SIGMOID
    if problem_type == "single_label_classification" or num_labels > 1:
        return ClassificationFunction.SOFTMAX
    configured = getattr(config, "function_to_apply", None)
    return ClassificationFunction(configured) if configured else ClassificationFunction.NONE


def apply_function(logits: np.ndarray, function: ClassificationFunction) -> np.ndarray:
    """Row-wise scores, with the same numpy formulas as transformers."""
    logits = logits.astype(np.float32, copy=False)
    if function is ClassificationFunction.SIGMOID:
        return 1.0 / (1.0 + np.exp(-logits))
    if function is ClassificationFunction.SOFTMAX:
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    if function is ClassificationFunction.NONE:
        return logits
    raise ValueError(f"unresolved function_to_apply {function!r}")


def top_k_predictions(
    scores: np.ndarray, id2label: Mapping[int, str], top_k: int
) -> list[Prediction]:
    """Top-k labels per row, best first; ties keep label order (a stable sort).

    `top_k` is capped at the number of labels; 0 or less means all labels.
    """
    num_labels = scores.shape[-1]
    k = num_labels if top_k <= 0 else min(top_k, num_labels)
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    results = []
    for row, idx in zip(scores, order, strict=True):
        results.append(
            Prediction(
                labels=[id2label[int(i)] for i in idx],
                scores=[float(s) for s in row[idx]],
            )
        )
    return results
