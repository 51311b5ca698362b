"""Beam counters (shown in Dataflow's UI), under one namespace.

Rows are counted once each, by their row status. In a several-model pass each
model also counts its own images, under its name (`cls_images_ok`,
`cls_images_failed`, `cls_error_<code>`).
"""

from __future__ import annotations

from apache_beam.metrics import Metrics

from transforms.errors import RowError, Status

METRICS_NAMESPACE = "image_labeler"


def _counter(name: str, model: str | None) -> None:
    Metrics.counter(METRICS_NAMESPACE, f"{model}_{name}" if model else name).inc()


def count_error(error: RowError, model: str | None = None) -> None:
    """Counters per status and per error code: `images_failed`,
    `images_failed_<code>`, `rows_<status>`, `error_<code>` (a row's); the
    same under `<model>_`, without `rows_<status>`, for one model's image."""
    _counter("images_failed", model)
    _counter(f"images_failed_{error.code.value}", model)
    _counter(f"error_{error.code.value}", model)
    if model is None:
        _counter(f"rows_{error.status.value}", None)


def count_ok(model: str | None = None) -> None:
    """Counters of a labeled image: `images_ok`, `rows_ok` (a row's);
    `<model>_images_ok` for one model's."""
    _counter("images_ok", model)
    if model is None:
        _counter(f"rows_{Status.OK.value}", None)
