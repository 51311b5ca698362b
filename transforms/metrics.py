"""Beam counters (shown in Dataflow's UI), under one namespace."""

from __future__ import annotations

from apache_beam.metrics import Metrics

from transforms.errors import RowError, Status

METRICS_NAMESPACE = "image_labeler"


def count_error(error: RowError) -> None:
    """Counters per status and per error code: `images_failed`,
    `images_failed_<code>`, `rows_<status>`, `error_<code>`."""
    Metrics.counter(METRICS_NAMESPACE, "images_failed").inc()
    Metrics.counter(METRICS_NAMESPACE, f"images_failed_{error.code.value}").inc()
    Metrics.counter(METRICS_NAMESPACE, f"rows_{error.status.value}").inc()
    Metrics.counter(METRICS_NAMESPACE, f"error_{error.code.value}").inc()


def count_ok() -> None:
    """Counters of a labeled image: `images_ok`, `rows_ok`."""
    Metrics.counter(METRICS_NAMESPACE, "images_ok").inc()
    Metrics.counter(METRICS_NAMESPACE, f"rows_{Status.OK.value}").inc()
