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
    scores: np.ndarray,
    id2label: Mapping[int, str],
    top_k: int,
    threshold: float | None = None,
    embeddings: np.ndarray | None = None,
) -> list[Prediction]:
    """Top-k labels per row, best first; ties keep label order (a stable sort).

    `top_k` is capped at the number of labels; 0 or less means all labels.
    With `threshold`, only labels scoring at least it are kept (multi-label
    tagging), still at most `top_k`; the top-1 `label`/`score` are set anyway.
    `embeddings` (one row per image) are attached to the predictions.
    """
    num_labels = scores.shape[-1]
    k = num_labels if top_k <= 0 else min(top_k, num_labels)
    order = np.argsort(-scores, axis=-1, kind="stable")
    results = []
    for n, (row, idx) in enumerate(zip(scores, order, strict=True)):
        best = int(idx[0])
        kept = idx[:k]
        if threshold is not None:
            kept = kept[row[kept] >= threshold]
        results.append(
            Prediction(
                labels=[id2label[int(i)] for i in kept],
                scores=[float(s) for s in row[kept]],
                label=id2label[best],
                score=float(row[best]),
                embedding=None if embeddings is None else embeddings[n],
            )
        )
    return results
