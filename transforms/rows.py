"""The record that travels through the graph, and the output columns it becomes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from transforms.errors import RowError, Status, format_error

#: Parquet metadata key of the `--output-prefix` an output was written with.
PREFIX_KEY = "image_labeler.output_prefix"
#: Parquet metadata key of `RecordFormat.status_prefix`, when an output has one.
STATUS_PREFIX_KEY = "image_labeler.status_prefix"
#: Parquet metadata key of the model names of a several-model pass (a JSON list).
MODELS_KEY = "image_labeler.models"

#: Our row-status columns. An input may carry its own bookkeeping under these
#: names (img2dataset's `status`, "success"/"failed_to_download"); ours then
#: take `OWN_STATUS_PREFIX` (`label_status`, `label_error`) and the input's stay.
ROW_STATUS_COLUMNS = ("status", "error")
OWN_STATUS_PREFIX = "label_"

#: The `--embeddings` column, after the label columns.
EMBEDDING_FIELD = pa.field("embedding", pa.list_(pa.float32()))

#: A model's columns: its labels, then its status (`ok` or why its labels
#: are missing) and error.
PREDICTION_FIELDS: tuple[pa.Field, ...] = (
    pa.field("label", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("scores", pa.list_(pa.float32())),
)
STATUS_FIELDS: tuple[pa.Field, ...] = (
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
)
LABEL_FIELDS: tuple[pa.Field, ...] = PREDICTION_FIELDS + STATUS_FIELDS


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
class ModelColumns:
    """The columns of one model of a several-model pass: `<name>_label`,
    `<name>_score`, `<name>_labels`, `<name>_scores`, `<name>_status`,
    `<name>_error` and, with `embeddings`, `<name>_embedding`."""

    name: str
    embeddings: bool = False


#: What one row's labeling gave: a `RowError` when the row failed before any
#: model (fetch, decode), else one result per model, in the format's order.
Results = RowError | Sequence["Prediction | RowError"]


@dataclass(frozen=True)
class RecordFormat:
    """The columns the labeler adds to each row: optional join-back columns
    (`source_file`, `source_row`) and the label columns, all with `prefix`.

    With `models` (a several-model pass) each model has its own label, status
    and error columns under its name (`ModelColumns`), and the row's `status`
    and `error` say whether every model labeled it: `ok` only then, else the
    first failure's status, and its error with the model's name
    (``inference_failed: tags: ...``).

    Attributes:
        prefix: prepended to every added column (``pred_`` gives ``pred_label``),
            so input columns of the same names are kept as they are.
        source: add `source_file` and `source_row` (the job always does).
        embeddings: add the `embedding` column (`--embeddings`).
        status_prefix: prepended (after `prefix`) to the row-status columns
            only: `OWN_STATUS_PREFIX` when the input has its own (`for_input`).
        models: the models of a several-model pass; empty for one model
            (unprefixed columns, `embeddings` for its embedding column).
    """

    prefix: str = ""
    source: bool = False
    embeddings: bool = False
    status_prefix: str = ""
    models: tuple[ModelColumns, ...] = ()

    @classmethod
    def for_input(
        cls,
        input_schema: pa.Schema,
        *,
        prefix: str = "",
        source: bool = True,
        embeddings: bool = False,
        models: Sequence[ModelColumns] = (),
    ) -> RecordFormat:
        """The format for an input: our `status`/`error` become `label_status`/
        `label_error` when the input has a column of either name (an upstream
        tool's bookkeeping, never renamed or dropped). A clash on any other
        added column is left for `schema` to refuse, naming `--output-prefix`."""
        fmt = cls(prefix=prefix, source=source, embeddings=embeddings, models=tuple(models))
        if any(fmt.name(c) in input_schema.names for c in ROW_STATUS_COLUMNS):
            return replace(fmt, status_prefix=OWN_STATUS_PREFIX)
        return fmt

    @property
    def model_names(self) -> tuple[str | None, ...]:
        """The models whose columns this format has: their names, or (None,)
        for the single model of an unprefixed output."""
        return tuple(m.name for m in self.models) or (None,)

    @property
    def tally_names(self) -> tuple[str, ...]:
        """The columns a summary of records reads: the source columns, the
        row's status and error, and each model's label, status and error."""
        names = [self.name(c) for c in ("source_file", "source_row", "status", "error")]
        for model in self.model_names:
            names += [self.name(c, model) for c in ("label", "status", "error")]
        return tuple(dict.fromkeys(names))

    def model_embeddings(self, model: str | None) -> bool:
        """Whether `model` (a name of `model_names`) has an embedding column."""
        if model is None:
            return self.embeddings
        return next(m.embeddings for m in self.models if m.name == model)

    @property
    def fields(self) -> tuple[pa.Field, ...]:
        source = tuple(f.with_name(self.name(f.name)) for f in SOURCE_FIELDS if self.source)
        if not self.models:  # one model: its labels, the row's status, the embedding last
            own = LABEL_FIELDS + ((EMBEDDING_FIELD,) if self.embeddings else ())
            return source + tuple(f.with_name(self.name(f.name)) for f in own)
        labels: list[pa.Field] = []
        for model in self.models:
            own = PREDICTION_FIELDS + STATUS_FIELDS
            own += (EMBEDDING_FIELD,) if model.embeddings else ()
            labels += [f.with_name(self.name(f.name, model.name)) for f in own]
        labels += [f.with_name(self.name(f.name)) for f in STATUS_FIELDS]
        return source + tuple(labels)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def metadata(self) -> dict[str, str]:
        """The Parquet metadata that lets `of_schema` find these columns again."""
        return {
            **({PREFIX_KEY: self.prefix} if self.prefix else {}),
            **({STATUS_PREFIX_KEY: self.status_prefix} if self.status_prefix else {}),
            **({MODELS_KEY: json.dumps([m.name for m in self.models])} if self.models else {}),
        }

    def name(self, column: str, model: str | None = None) -> str:
        """The output name of an added column (`status` -> `pred_status`); of
        a model's own column with `model` (`label`, "cls" -> `pred_cls_label`)."""
        if model is not None:
            return f"{self.prefix}{model}_{column}"
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
        models = tuple(
            ModelColumns(name, f"{prefix}{name}_{EMBEDDING_FIELD.name}" in names)
            for name in json.loads(metadata.get(MODELS_KEY.encode(), b"[]").decode())
        )
        return cls(
            prefix=prefix,
            source=prefix + "source_file" in names,
            embeddings=prefix + EMBEDDING_FIELD.name in names,
            status_prefix=metadata.get(STATUS_PREFIX_KEY.encode(), b"").decode(),
            models=models,
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

    def record(self, row: ImageRow, results: Results) -> dict[str, Any]:
        """The output record of a row: its passthrough values, its source, and
        each model's columns (see `Results`)."""
        record = dict(row.values)
        if self.source:
            record[self.name("source_file")] = row.source_file
            record[self.name("source_row")] = row.source_row
        names = self.model_names
        per_model = [results] * len(names) if isinstance(results, RowError) else list(results)
        if len(per_model) != len(names):
            raise ValueError(f"{len(per_model)} results for the models {list(names)}")
        failed: tuple[str | None, RowError] | None = None
        for model, result in zip(names, per_model, strict=True):
            self._model_columns(record, model, result)
            if failed is None and isinstance(result, RowError):
                failed = (model, result)
        if self.models:
            if failed is None:
                status, error = Status.OK.value, None
            else:
                model, failure = failed
                status = failure.status.value
                error = (
                    str(failure)
                    if isinstance(results, RowError)
                    else format_error(failure.code, f"{model}: {failure.message}")
                )
            record[self.name("status")] = status
            record[self.name("error")] = error
        return record

    def _model_columns(
        self, record: dict[str, Any], model: str | None, result: Prediction | RowError
    ) -> None:
        # One model's columns; its status and error are the row's when alone.
        embeddings = self.model_embeddings(model)
        if isinstance(result, RowError):
            values: dict[str, Any] = dict.fromkeys(("label", "score", "labels", "scores"))
            values.update(status=result.status.value, error=str(result))
            if embeddings:
                values["embedding"] = None
        else:
            values = {
                "label": result.label,
                "score": result.score,
                "labels": list(result.labels),
                "scores": list(result.scores),
                "status": Status.OK.value,
                "error": None,
            }
            if embeddings:
                values["embedding"] = result.embedding
        for column, value in values.items():
            record[self.name(column, model)] = value

    def ok(self, row: ImageRow, prediction: Prediction) -> dict[str, Any]:
        """The output record of a row one model labeled."""
        return self.record(row, [prediction])

    def error(self, row: ImageRow, error: RowError) -> dict[str, Any]:
        """The output record of a row that failed: same columns, no labels."""
        return self.record(row, error)
