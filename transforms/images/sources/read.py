"""Reading the planned input into `ImageRow`s: manifests (txt, CSV, JSONL),
Parquet, Arrow (Hugging Face `datasets`' `save_to_disk`), WebDataset tar shards
and img2dataset output folders.

`plan_input` plans the input once, when the job is built: files are matched,
the format and the URI or image column are decided and the passthrough schema
is fixed, so a bad input fails before any worker starts. `ReadImageRows` then
reads the planned files on the workers with the format's `Reader`: Parquet is
split by row group so large inputs spread across workers, and every row is
keyed by its position.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import fsspec
import pyarrow as pa

from transforms.errors import ErrorCode, RowError, redact_uri
from transforms.images.sources import manifest, tables, webdataset
from transforms.images.sources.plan import (
    TEXT_URI_COLUMN,
    InputError,
    InputPlan,
    Reader,
    Rows,
    _strip_compression,
    choose_image_column,
    choose_uri_column,
    detect_format,
    is_image_file,
    match_files,
    one_unit,
)
from transforms.images.sources.tables import IMG2DATASET_IMAGE
from transforms.rows import ImageRow
from transforms.uri import parent, resolve_uri, scheme_of

logger = logging.getLogger(__name__)


def _read_shard(plan: InputPlan, path: str, _: int) -> Rows:
    return webdataset.read_shard(path, plan.max_member_bytes)


def _count_samples(plan: InputPlan, path: str, max_bytes: int) -> int | None:
    # Uncompressed local shards only: count_samples gives None for the others.
    return webdataset.count_samples(path) if scheme_of(path) == "file" else None


#: The reader of each input format (`--input-format`), in the order the help lists them.
READERS: dict[str, Reader] = {
    "text": manifest.TEXT,
    "csv": manifest.CSV,
    "jsonl": manifest.JSONL,
    "parquet": tables.PARQUET,
    "arrow": tables.ARROW,
    "webdataset": Reader(read=_read_shard, count=_count_samples, by_offset=True),
    "img2dataset": tables.IMG2DATASET,
}
FORMATS = tuple(READERS)


def plan_input(
    pattern: str,
    *,
    uri_column: str | None = None,
    image_column: str | None = None,
    keep_image_column: bool = False,
    input_format: str = "auto",
    encoding: str = "utf-8",
    max_member_bytes: int = 50 << 20,
) -> InputPlan:
    """Match the input and fix its format, image source and passthrough schema.

    Args:
        pattern: a file, glob or directory; local or any fsspec URI.
        uri_column: the column holding image URIs; auto-detected when None.
        image_column: the Parquet column holding the images themselves (binary,
            or a struct with `bytes` and `path` as Hugging Face `datasets`
            writes it). When neither column is given, an embedded image column
            is looked for first, then a URI column.
        keep_image_column: copy the image bytes to the output too.
        input_format: one of `FORMATS`, or "auto" to go by the file extension.
        max_member_bytes: WebDataset members larger than this are `too_large` rows.

    Raises:
        InputError: when the input cannot be used; the message says why.
    """
    sidecars = (
        tables.img2dataset_sidecars(pattern) if input_format in ("auto", "img2dataset") else None
    )
    if sidecars:
        if uri_column or image_column:
            flag = "--uri-column" if uri_column else "--image-column"
            raise InputError(
                f"{flag} does not apply to an img2dataset folder: each row's image is its "
                "sample in the shard beside it"
            )
        schema = tables.unify_parquet_schemas(sidecars)
        if IMG2DATASET_IMAGE in schema.names:
            raise InputError(f"--input {pattern}: its column {IMG2DATASET_IMAGE!r} is reserved")
        return InputPlan(
            tuple(sidecars),
            "img2dataset",
            None,
            schema.append(pa.field(IMG2DATASET_IMAGE, pa.binary())),
            image_column=IMG2DATASET_IMAGE,
            keep_image_column=keep_image_column,
            max_member_bytes=max_member_bytes,
        )
    if input_format == "img2dataset":
        raise InputError(f"--input {pattern} is no img2dataset folder (NNNNN.tar + .parquet)")
    files = match_files(pattern)
    images = [f for f in files if is_image_file(f)] if input_format == "auto" else []
    if images:
        more = f" and {len(images) - 1} more" if len(images) > 1 else ""
        raise InputError(
            f"--input {pattern} names image files ({posixpath.basename(images[0])}{more}), "
            "not a manifest: list their paths one per line (ls DIR/*.jpg > photos.txt) "
            "and pass --input photos.txt"
        )
    formats = {detect_format(f) for f in files} if input_format == "auto" else {input_format}
    if len(formats) > 1:
        raise InputError(f"--input {pattern} mixes formats {sorted(formats)}; pass one format")
    fmt = formats.pop()
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}; expected one of {FORMATS}")
    delimiter = "\t" if _strip_compression(files[0]).lower().endswith(".tsv") else ","
    if fmt == "webdataset":
        if uri_column or image_column:
            flag = "--uri-column" if uri_column else "--image-column"
            raise InputError(
                f"{flag} does not apply to WebDataset shards: each sample's image member "
                f"({', '.join(webdataset.IMAGE_SUFFIXES)}) is labeled"
            )
        return InputPlan(
            tuple(files),
            fmt,
            None,
            webdataset.SCHEMA,
            image_column=webdataset.IMAGE_COLUMN,
            keep_image_column=keep_image_column,
            max_member_bytes=max_member_bytes,
        )
    if fmt == "parquet":
        schema = tables.unify_parquet_schemas(files)
    elif fmt == "arrow":
        schema = tables.unify_arrow_schemas(files)
    else:
        schema = manifest.infer_schema(files[0], fmt, delimiter, encoding)
    if image_column and fmt not in ("parquet", "arrow"):
        raise InputError("--image-column needs Parquet or Arrow input")
    if fmt in ("parquet", "arrow") and (image_column or not uri_column):
        chosen_image = choose_image_column(schema, image_column, files[0])
        if chosen_image:
            chosen_uri = choose_uri_column(schema, uri_column, files[0]) if uri_column else None
            return InputPlan(
                tuple(files), fmt, chosen_uri, schema, delimiter, chosen_image, keep_image_column
            )
    if fmt == "text":
        if uri_column not in (None, TEXT_URI_COLUMN):
            raise InputError(
                f"--uri-column {uri_column!r} does not apply to a plain-text manifest, "
                "whose only column is 'uri'"
            )
        chosen = TEXT_URI_COLUMN
    else:
        chosen = choose_uri_column(schema, uri_column, files[0])
    return InputPlan(tuple(files), fmt, chosen, schema, delimiter, encoding=encoding)


def _to_text(value: Any) -> str | None:
    if value is None:
        return None
    return str(value).strip()


class _ReadRows(beam.DoFn):
    """Reads one work unit (a file, or a Parquet row group) into `ImageRow`s."""

    def __init__(self, plan: InputPlan) -> None:
        self._plan = plan

    def process(self, unit: tuple[int, str, int]) -> Iterator[ImageRow]:
        file_no, path, part = unit
        base = parent(path)
        reader = READERS[self._plan.format]
        image_column = self._plan.image_column
        source_file = redact_uri(path)
        for position, (row_no, values, error) in enumerate(reader.read(self._plan, path, part)):
            source_row = row_no if reader.by_offset else position
            image = None
            raw = _to_text(values.get(self._plan.uri_column)) if self._plan.uri_column else None
            if image_column:
                cell = (
                    values[image_column]
                    if self._plan.keep_image_column
                    else values.pop(image_column)
                )
                if isinstance(cell, dict):  # {bytes, path}: fetch the path when bytes is null
                    image = cell.get("bytes")
                    raw = raw or _to_text(cell.get("path"))
                    if self._plan.image_path_column:
                        values[self._plan.image_path_column] = cell.get("path")
                else:
                    image = cell
                if image is None and not raw and error is None:
                    error = RowError(
                        ErrorCode.EMPTY_URI, f"column {image_column!r} has no bytes and no path"
                    )
            uri = resolve_uri(raw, base) if raw else raw
            yield ImageRow(
                index=f"{file_no}:{row_no}",
                uri=uri,
                values=values,
                error=error,
                image=image,
                source_file=source_file,
                source_row=source_row,
            )


class _SplitUnits(beam.DoFn):
    """Turns a file into its work units (one per Parquet row group)."""

    def __init__(self, plan: InputPlan) -> None:
        self._plan = plan

    def process(self, item: tuple[int, str]) -> Iterator[tuple[int, str, int]]:
        file_no, path = item
        for unit in range(READERS[self._plan.format].units(self._plan, path)):
            yield file_no, path, unit


class ReadImageRows(beam.PTransform):
    """Reads a planned input into a PCollection of `ImageRow`.

    Example::

        plan = plan_input("gs://bucket/manifests/*.csv")
        rows = pipeline | ReadImageRows(plan)
    """

    def __init__(self, plan: InputPlan) -> None:
        super().__init__()
        self._plan = plan

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        plan = self._plan
        if len(plan.files) == 1 and READERS[plan.format].units is one_unit:
            # One work unit in all: there is nothing to spread, and each step
            # saved is a stage less on a local run.
            units = pbegin | "ListUnits" >> beam.Create([(0, plan.files[0], 0)])
        else:
            units = (
                pbegin
                | "ListFiles" >> beam.Create(list(enumerate(plan.files)))
                | "SplitUnits" >> beam.ParDo(_SplitUnits(plan))
                # Spread files and row groups over workers before reading them.
                | "SpreadUnits" >> beam.Reshuffle()
            )
        rows = units | "ReadRows" >> beam.ParDo(_ReadRows(plan))
        if plan.image_column:
            # Rows carry image bytes: shuffling them would copy every image and,
            # on a local runner, hold them all in memory. Row groups are spread.
            return rows
        # A manifest file is read by one worker; spread its rows so fetching and
        # inference run everywhere (Dataflow fuses steps otherwise).
        return rows | "SpreadRows" >> beam.Reshuffle()


def read_rows_here(plan: InputPlan, max_bytes: int = 256 << 20) -> Iterator[ImageRow] | None:
    """The planned input's rows, read in this process when that is cheap: local
    files of at most `max_bytes` in all. None otherwise."""
    size = 0
    for path in plan.files:
        if scheme_of(path) != "file":
            return None
        size += fsspec.filesystem("file").size(path)
    if size > max_bytes:
        return None

    def rows() -> Iterator[ImageRow]:
        split, read = _SplitUnits(plan), _ReadRows(plan)
        for item in enumerate(plan.files):
            for unit in split.process(item):
                yield from read.process(unit)

    return rows()


def count_rows(plan: InputPlan, max_bytes: int = 256 << 20) -> int | None:
    """Row count for progress, when it is cheap to know; None otherwise.

    Parquet counts come from file footers; local manifests of at most
    `max_bytes` are counted by their lines (see each format's `Reader.count`).
    """
    total = 0
    for path in plan.files:
        count = READERS[plan.format].count(plan, path, max_bytes)
        if count is None:
            return None
        total += count
    return total
