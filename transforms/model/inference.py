"""Per-image isolation of inference failures, shared by our ModelHandlers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from transforms.errors import ErrorCode, RowError
from transforms.rows import Prediction

logger = logging.getLogger(__name__)

T = TypeVar("T")


def isolate_failures(
    batch: Sequence[T], predict: Callable[[Sequence[T]], Iterable[Prediction | RowError]]
) -> list[Prediction | RowError]:
    """Run `predict` on the batch; if it raises, retry image by image.

    Only the images that fail on their own get an `inference_failed` error, so
    one bad image never costs its batch neighbours their labels.
    """
    try:
        return list(predict(batch))
    except Exception as e:
        if len(batch) == 1:
            return [RowError(ErrorCode.INFERENCE_FAILED, f"{type(e).__name__}: {e}")]
        logger.warning("A batch of %d failed (%s); retrying image by image", len(batch), e)
    results: list[Prediction | RowError] = []
    for example in batch:
        results.extend(isolate_failures([example], predict))
    return results
