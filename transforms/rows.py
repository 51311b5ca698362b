"""The record that travels through the graph, and the output columns it becomes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from transforms.errors import RowError, Status

#: Columns the labeler adds to every output row, in order.
LABEL_COLUMNS: tuple[str, ...] = ("label", "score", "labels", "scores", "status", "error")

LABEL_FIELDS: tuple[pa.Field, ...] = (
    pa.field("label", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("scores", pa.list_(pa.float32())),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
)


@dataclass(frozen=True)
class ImageRow:
    """One input row.

    Attributes:
        index: position of the row in the input (``"<file>:<row>"``). Rows are keyed
            by position, never by URI, so duplicate URIs stay distinct rows.
        uri: the resolved URI to fetch; None when the row has none.
        values: the passthrough columns, exactly as read.
        error: set when the row was already invalid when read (e.g. a malformed
            manifest line); such a row skips fetch and inference.
        image: the image itself, when the row carries it: encoded bytes (Parquet
            with embedded images) or a PIL image (the Python API). Then `uri`
            is not fetched.
    """

    index: str
    uri: str | None
    values: Mapping[str, Any] = field(default_factory=dict)
    error: RowError | None = None
    image: Any = None


@dataclass(frozen=True)
class Prediction:
    """Top-k labels and scores of one image, best first."""

    labels: list[str]
    scores: list[float]


def output_schema(input_schema: pa.Schema, metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """The output schema: every input column, then `LABEL_FIELDS`.

    Raises:
        ValueError: when an input column already uses one of the output names.
    """
    clash = [name for name in input_schema.names if name in LABEL_COLUMNS]
    if clash:
        raise ValueError(
            f"input column(s) {clash} clash with the output columns {list(LABEL_COLUMNS)}; "
            "rename them in the input (or drop them) before labeling"
        )
    schema = pa.schema(list(input_schema) + list(LABEL_FIELDS))
    if metadata:
        schema = schema.with_metadata({k: v for k, v in metadata.items()})
    return schema


def ok_record(row: ImageRow, prediction: Prediction) -> dict[str, Any]:
    """The output record of a labeled row."""
    record = dict(row.values)
    record.update(
        label=prediction.labels[0] if prediction.labels else None,
        score=prediction.scores[0] if prediction.scores else None,
        labels=list(prediction.labels),
        scores=list(prediction.scores),
        status=Status.OK.value,
        error=None,
    )
    return record


def error_record(row: ImageRow, error: RowError) -> dict[str, Any]:
    """The output record of a row that failed: same columns, no labels."""
    record = dict(row.values)
    record.update(
        label=None,
        score=None,
        labels=None,
        scores=None,
        status=error.status.value,
        error=str(error),
    )
    return record
