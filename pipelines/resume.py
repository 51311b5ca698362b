"""`--skip-existing`: label only the rows a previous run did not label.

A row is done when the previous output holds an `ok` row with the same URI
(the URI column's value as written in the input), labeled by the same model,
revision, task and label set. Everything else (missing rows, error rows) is
labeled again. The URIs are read in the pipeline, so a previous output of
millions of rows never passes through the launcher.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import fsspec
import pyarrow.parquet as pq

from pipelines.config import ConfigError, JobConfig
from pipelines.output import SHARD_PREFIX, SHARD_SUFFIX
from transforms.errors import Status
from transforms.images.sources import InputPlan, read_rows_here
from transforms.resolve import MODEL_KEY_PREFIX
from transforms.rows import MODELS_KEY, PREFIX_KEY, ImageRow, RecordFormat
from transforms.uri import with_protocol

logger = logging.getLogger(__name__)

SKIPPED_TAG = "skipped"
#: Metadata that must match for a previous row to count as done (and, with the
#: output prefix, for a `--resume` to continue a run: `run_identity`).
IDENTITY_KEYS = (
    "image_labeler.task",
    "image_labeler.model",
    "image_labeler.revision",
    "image_labeler.label_set_sha256",
)


def labeling_identity(metadata: Mapping[str, str]) -> dict[str, str]:
    """The labeling identity in an output's metadata: each model's model,
    revision, task and label set (`IDENTITY_KEYS`), and the models' names."""
    suffixes = {key.split(".", 1)[1] for key in IDENTITY_KEYS}
    return {
        k: v
        for k, v in metadata.items()
        if k in IDENTITY_KEYS
        or k == MODELS_KEY
        or (k.startswith(MODEL_KEY_PREFIX) and k.rsplit(".", 1)[-1] in suffixes)
    }


def run_identity(metadata: Mapping[str, str], input_uri: str) -> dict[str, str]:
    """What a `--resume` must find unchanged: the labeling identity (model,
    revision, task, label set), the output prefix and the (redacted) input."""
    prefix = {PREFIX_KEY: metadata[PREFIX_KEY]} if PREFIX_KEY in metadata else {}
    return labeling_identity(metadata) | prefix | {"input": input_uri}


def previous_shards(directory: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(directory)
    pattern = posixpath.join(root, f"{SHARD_PREFIX}-*{SHARD_SUFFIX}")
    return [with_protocol(directory, p) for p in sorted(fs.glob(pattern))]


@dataclass(frozen=True)
class PreviousOutput:
    """A previous output whose `ok` rows `--skip-existing` skips.

    Attributes:
        directory: the output directory.
        status_column: its row-status column, as its own record format names it.
    """

    directory: str
    status_column: str


def check_previous_output(
    config: JobConfig, plan: InputPlan, metadata: Mapping[str, str]
) -> PreviousOutput | None:
    """Validate `--skip-existing` at build time; None when nothing can be reused.

    Raises:
        ConfigError: for a previous output that cannot be used at all.
    """
    previous = config.skip_existing
    assert previous is not None
    if not plan.uri_column:
        raise ConfigError("--skip-existing needs a URI column to match rows on")
    shards = previous_shards(previous)
    if not shards:
        raise ConfigError(f"--skip-existing {previous} holds no {SHARD_PREFIX}-*.parquet files")
    with fsspec.open(shards[0], "rb") as f:
        schema = pq.read_schema(f)
    status = RecordFormat.of_schema(schema).name("status")
    if plan.uri_column not in schema.names or status not in schema.names:
        raise ConfigError(
            f"--skip-existing {previous} has no {plan.uri_column!r} and {status!r} columns"
        )
    found = labeling_identity({k.decode(): v.decode() for k, v in (schema.metadata or {}).items()})
    wanted = labeling_identity(metadata)
    # A missing key and an empty one are the same (no revision, no label set).
    different = sorted(
        k for k in found.keys() | wanted.keys() if found.get(k, "") != wanted.get(k, "")
    )
    if different:
        logger.warning(
            "--skip-existing %s was labeled with different %s; no row of it is reused",
            previous,
            ", ".join(f"{k.split('.', 1)[1]} ({found.get(k, '')!r})" for k in different),
        )
        return None
    return PreviousOutput(previous, status)


def done_uris_here(previous: PreviousOutput, uri_column: str) -> set[Any]:
    """The URIs with an `ok` row in a previous output, read in this process
    (`ReadDoneUris` reads them in the pipeline)."""
    done: set[Any] = set()
    for shard in previous_shards(previous.directory):
        with fsspec.open(shard, "rb") as f:
            table = pq.read_table(f, columns=[uri_column, previous.status_column])
        uris, statuses = table.column(0).to_pylist(), table.column(1).to_pylist()
        done.update(u for u, s in zip(uris, statuses, strict=True) if s == Status.OK.value and u)
    return done


def count_skipped(plan: InputPlan, previous: PreviousOutput) -> int | None:
    """How many input rows `--skip-existing` skips, when cheap to know (else None).

    The rule of `SkipDone`: a row read without error whose URI has an `ok` row
    in the previous output. For the progress total of local runs, so that the
    first progress line already counts only the rows to label.
    """
    rows = read_rows_here(plan)
    if rows is None or not plan.uri_column:
        return None
    done = done_uris_here(previous, plan.uri_column)
    column = plan.uri_column
    return sum(1 for row in rows if row.error is None and row.values.get(column) in done)


class ReadDoneUris(beam.PTransform):
    """The set of URIs with an `ok` row in a previous output (one element).

    Args:
        previous: the previous output.
        uri_column: the input's URI column (the user's own, never prefixed).
    """

    def __init__(self, previous: PreviousOutput, uri_column: str) -> None:
        super().__init__()
        self._directory = previous.directory
        self._uri_column = uri_column
        self._status = previous.status_column

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        uri_column, status = self._uri_column, self._status
        ok = Status.OK.value
        return (
            pbegin
            | "ReadPrevious"
            >> beam.io.ReadFromParquet(
                self._directory.rstrip("/") + f"/{SHARD_PREFIX}-*{SHARD_SUFFIX}",
                columns=[uri_column, status],
            )
            | "OkUris"
            >> beam.FlatMap(lambda r: [r[uri_column]] if r[status] == ok and r[uri_column] else [])
            | "ToSet" >> beam.CombineGlobally(beam.combiners.ToSetCombineFn())
        )


class SkipDone(beam.DoFn):
    """Rows whose URI is done go to the `skipped` output; the rest pass on."""

    def __init__(self, uri_column: str) -> None:
        self._uri_column = uri_column

    def process(self, row: ImageRow, done: Any) -> Iterator[Any]:
        if row.error is None and row.values.get(self._uri_column) in done:
            yield beam.pvalue.TaggedOutput(SKIPPED_TAG, row.index)
        else:
            yield row


# ---- --resume: the rows an interrupted run already committed ----------------------------


class ReadCommitted(beam.PTransform):
    """The label columns of the part files an interrupted run committed.

    Yields one dict per committed row with `source_file`, `source_row` and the
    columns the summary counts (`RecordFormat.tally_names`: the row's `status`
    and `error`, each model's `label`, `status` and `error`), named by `fmt`.
    """

    def __init__(self, directory: str, files: Sequence[str], fmt: RecordFormat) -> None:
        super().__init__()
        self._paths = [directory.rstrip("/") + "/" + name for name in files]
        self._columns = list(fmt.tally_names)

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "CommittedFiles" >> beam.Create(self._paths)
            | "ReadCommittedFiles" >> beam.io.ReadAllFromParquet(columns=self._columns)
        )


class SkipCommitted(beam.DoFn):
    """Rows an interrupted run already committed are dropped (counted as resumed)."""

    def process(self, row: ImageRow, committed: Any) -> Iterator[ImageRow]:
        if (row.source_file, row.source_row) not in committed:
            yield row
