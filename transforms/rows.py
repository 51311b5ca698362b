"""The record that travels through the graph, and the output columns it becomes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from transforms.errors import RowError, Status

#: Parquet metadata key of the `--output-prefix` an output was written with.
PREFIX_KEY = "image_labeler.output_prefix"
#: Parquet metadata key of `RecordFormat.status_prefix`, when an output has one.
STATUS_PREFIX_KEY = "image_labeler.status_prefix"

#: Our row-status columns. An input may carry its own bookkeeping under these
#: names (img2dataset's `status`, "success"/"failed_to_download"); ours then
#: take `OWN_STATUS_PREFIX` (`label_status`, `label_error`) and the input's stay.
ROW_STATUS_COLUMNS = ("status", "error")
OWN_STATUS_PREFIX = "label_"

#: The `--embeddings` column, after the label columns.
EMBEDDING_FIELD = pa.field("embedding", pa.list_(pa.float32()))

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
        source_file, source_row: where the row came from, for joining results
            back to the input (rows read from files; None through the API).
    """

    index: str
    uri: str | None
    values: Mapping[str, Any] = field(default_factory=dict)
    error: RowError | None = None
    image: Any = None
    source_file: str | None = None  # the input file the row came from (redacted)
    source_row: int | None = None  # its 0-based row index within that file


@dataclass(frozen=True)
class Prediction:
    """The labels of one image.

    Attributes:
        labels, scores: the kept labels, best first: the top k, or with a
            threshold every label scoring at least it (up to k); may be empty.
        label, score: the top-1 label and score, kept even when the threshold
            leaves `labels` empty (default: the first of `labels`).
        embedding: the image's L2-normalized embedding (float32), when asked for.
    """

    labels: list[str]
    scores: list[float]
    label: str | None = None
    score: float | None = None
    embedding: Any = None

    def __post_init__(self) -> None:
        if self.label is None and self.labels:
            object.__setattr__(self, "label", self.labels[0])
            object.__setattr__(self, "score", self.scores[0])


SOURCE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("source_file", pa.string()),
    pa.field("source_row", pa.int64()),
)


@dataclass(frozen=True)
class RecordFormat:
    """The columns the labeler adds to each row: optional join-back columns
    (`source_file`, `source_row`) and the label columns, all with `prefix`.

    Attributes:
        prefix: prepended to every added column (``pred_`` gives ``pred_label``),
            so input columns of the same names are kept as they are.
        source: add `source_file` and `source_row` (the job always does).
        embeddings: add the `embedding` column (`--embeddings`).
        status_prefix: prepended (after `prefix`) to the row-status columns
            only: `OWN_STATUS_PREFIX` when the input has its own (`for_input`).
    """

    prefix: str = ""
    source: bool = False
    embeddings: bool = False
    status_prefix: str = ""

    @classmethod
    def for_input(
        cls, input_schema: pa.Schema, *, prefix: str = "", source: bool = True, embeddings: bool
    ) -> RecordFormat:
        """The format for an input: our `status`/`error` become `label_status`/
        `label_error` when the input has a column of either name (an upstream
        tool's bookkeeping, never renamed or dropped). A clash on any other
        added column is left for `schema` to refuse, naming `--output-prefix`."""
        fmt = cls(prefix=prefix, source=source, embeddings=embeddings)
        if any(fmt.name(c) in input_schema.names for c in ROW_STATUS_COLUMNS):
            return replace(fmt, status_prefix=OWN_STATUS_PREFIX)
        return fmt

    @property
    def fields(self) -> tuple[pa.Field, ...]:
        added = (
            (SOURCE_FIELDS if self.source else ())
            + LABEL_FIELDS
            + ((EMBEDDING_FIELD,) if self.embeddings else ())
        )
        return tuple(f.with_name(self.name(f.name)) for f in added)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def metadata(self) -> dict[str, str]:
        """The Parquet metadata that lets `of_schema` find these columns again."""
        return {
            **({PREFIX_KEY: self.prefix} if self.prefix else {}),
            **({STATUS_PREFIX_KEY: self.status_prefix} if self.status_prefix else {}),
        }

    def name(self, column: str) -> str:
        """The output name of an added column (`status` -> `pred_status`)."""
        if column in ROW_STATUS_COLUMNS:
            return self.prefix + self.status_prefix + column
        return self.prefix + column

    @classmethod
    def of_schema(cls, schema: pa.Schema) -> RecordFormat:
        """The format an existing output was written with, read from its schema.

        The prefix comes from the `PREFIX_KEY` metadata the job writes (none when
        absent), so a reader of an earlier output (`--skip-existing`, `--resume`,
        the report) finds its columns under `--output-prefix` too.
        """
        metadata = schema.metadata or {}
        prefix = metadata.get(PREFIX_KEY.encode(), b"").decode()
        names = set(schema.names)
        return cls(
            prefix=prefix,
            source=prefix + "source_file" in names,
            embeddings=prefix + EMBEDDING_FIELD.name in names,
            status_prefix=metadata.get(STATUS_PREFIX_KEY.encode(), b"").decode(),
        )

    def schema(
        self, input_schema: pa.Schema, metadata: Mapping[str, str] | None = None
    ) -> pa.Schema:
        """The output schema: every input column, then the added ones.

        Raises:
            ValueError: an input column already has one of the added names.
        """
        clash = [name for name in input_schema.names if name in self.names]
        if clash:
            hint = (
                "pass --output-prefix (e.g. --output-prefix pred_) to rename the prediction columns"
                if not self.prefix
                else "choose another --output-prefix"
            )
            raise ValueError(
                f"input column(s) {clash} clash with the output columns {list(self.names)}; "
                f"{hint}, or rename them in the input"
            )
        schema = pa.schema(list(input_schema) + list(self.fields))
        if metadata:
            schema = schema.with_metadata({k: v for k, v in metadata.items()})
        return schema

    def _record(self, row: ImageRow, labels: dict[str, Any]) -> dict[str, Any]:
        record = dict(row.values)
        if self.source:
            record[self.name("source_file")] = row.source_file
            record[self.name("source_row")] = row.source_row
        for key, value in labels.items():
            record[self.name(key)] = value
        return record

    def ok(self, row: ImageRow, prediction: Prediction) -> dict[str, Any]:
        """The output record of a labeled row."""
        labels = {
            "label": prediction.label,
            "score": prediction.score,
            "labels": list(prediction.labels),
            "scores": list(prediction.scores),
            "status": Status.OK.value,
            "error": None,
        }
        if self.embeddings:
            labels["embedding"] = prediction.embedding
        return self._record(row, labels)

    def error(self, row: ImageRow, error: RowError) -> dict[str, Any]:
        """The output record of a row that failed: same columns, no labels."""
        return self._record(
            row,
            {
                "label": None,
                "score": None,
                "labels": None,
                "scores": None,
                "status": error.status.value,
                "error": str(error),
                **({"embedding": None} if self.embeddings else {}),
            },
        )
