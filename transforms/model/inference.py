"""Helpers shared by our ModelHandlers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

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


# ---- preloading ---------------------------------------------------------------------

_PRELOADED: dict[str, Future[Any]] = {}
_PRELOAD_LOCK = threading.Lock()


def start_preload(key: str, load: Callable[[], Any]) -> None:
    """Start loading a model in a background thread of this process.

    For local in-process runs the launcher calls this before the pipeline
    starts, so the model loads while Beam plans stages and reads the input;
    the handler's `load_model` then takes the result (`take_preloaded`).
    """
    with _PRELOAD_LOCK:
        if key in _PRELOADED:
            return
        future: Future[Any] = Future()
        _PRELOADED[key] = future

    def work() -> None:
        try:
            future.set_result(load())
        except BaseException as e:  # surfaced by take_preloaded in load_model
            future.set_exception(e)

    threading.Thread(target=work, name="preload-model", daemon=True).start()


def take_preloaded(key: str) -> Any | None:
    """The preloaded model for `key` (waiting for it), once; None if none was started."""
    with _PRELOAD_LOCK:
        future = _PRELOADED.pop(key, None)
    return None if future is None else future.result()
