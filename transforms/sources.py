"""Reading image manifests (txt, CSV, JSONL) and Parquet into `ImageRow`s.

The input is planned once, when the job is built (`plan_input`): files are
matched, the format and the URI column are decided and the passthrough schema is
fixed, so a bad input fails before any worker starts. The `ReadImageRows`
transform then reads the planned files on the workers: Parquet is split by row
group so large inputs spread across workers, and every row is keyed by its
position.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from transforms.errors import ErrorCode, RowError
from transforms.rows import ImageRow

logger = logging.getLogger(__name__)

FORMATS = ("text", "csv", "jsonl", "parquet")
#: URI columns tried, in order, when `--uri-column` is not given and `uri` is absent.
URI_COLUMN_CANDIDATES = ("uri", "image_url", "url", "path", "image_path")
TEXT_URI_COLUMN = "uri"

_EXTENSIONS = {
    ".txt": "text",
    ".lst": "text",
    ".list": "text",
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# Schema inference for CSV/JSONL looks at this much of the first file.
_INFER_BYTES = 4 << 20
# Parquet is read in record batches of this many rows, so a huge row group
# never sits in memory whole.
PARQUET_READ_BATCH_ROWS = 1024
PARQUET_READ_BATCH_BYTES = 32 << 20


class InputError(ValueError):
    """The input cannot be read as asked. The message says what to change."""


@dataclass(frozen=True)
class InputPlan:
    """Everything the workers need to read the input, decided at build time."""

    files: tuple[str, ...]
    format: str
    uri_column: str | None
    schema: pa.Schema  # columns read, in input order
    delimiter: str = ","
    image_column: str | None = None  # Parquet with the images inside
    keep_image_column: bool = False

    @property
    def passthrough_schema(self) -> pa.Schema:
        """The input columns copied to the output (image bytes only when asked)."""
        if self.image_column and not self.keep_image_column:
            return self.schema.remove(self.schema.get_field_index(self.image_column))
        return self.schema


def _strip_compression(path: str) -> str:
    for ext in _COMPRESSIONS:
        if path.lower().endswith(ext):
            return path[: -len(ext)]
    return path


def detect_format(path: str) -> str:
    """The input format implied by a file name (compression suffixes ignored)."""
    ext = posixpath.splitext(_strip_compression(path).lower())[1]
    return _EXTENSIONS.get(ext, "text")


def _protocol(path: str) -> str:
    return path.split("://", 1)[0].lower() if "://" in path else "file"


def with_protocol(original: str, found: str) -> str:
    """fsspec globs drop the protocol of remote paths; put `original`'s back."""
    proto = _protocol(original)
    if proto == "file" or "://" in found:
        return found
    return f"{proto}://{found}"


def match_files(pattern: str) -> list[str]:
    """Expand a path, glob or directory URI into a sorted list of files."""
    fs, _, _ = fsspec.get_fs_token_paths(pattern)
    if _protocol(pattern) in ("http", "https"):
        return [pattern]
    if any(ch in pattern for ch in "*?["):
        found = [p for p in fs.glob(pattern) if not fs.isdir(p)]
    elif fs.isdir(pattern):
        found = [p for p in fs.find(pattern) if detect_format(p) == "parquet"]
        if not found:
            raise InputError(
                f"--input {pattern} is a directory with no *.parquet files; "
                "point it at a manifest file or a glob such as 'dir/*.csv'"
            )
    elif fs.exists(pattern):
        found = [pattern]
    else:
        raise InputError(f"--input {pattern} does not exist")
    if not found:
        raise InputError(f"--input {pattern} matches no files")
    return sorted(with_protocol(pattern, p) for p in found)


def _read_head(path: str, limit: int | None = None) -> bytes:
    limit = limit or _INFER_BYTES
    with fsspec.open(path, "rb", compression="infer") as f:
        head: bytes = f.read(limit)
        if len(head) == limit:  # cut at the last full line
            head = head[: head.rfind(b"\n") + 1]
        return head


def _infer_schema(path: str, fmt: str, delimiter: str) -> pa.Schema:
    if fmt == "text":
        return pa.schema([pa.field(TEXT_URI_COLUMN, pa.string())])
    if fmt == "parquet":
        with fsspec.open(path, "rb") as f:
            schema: pa.Schema = pq.read_schema(f)
        return schema.remove_metadata()
    head = _read_head(path)
    try:
        if fmt == "csv":
            # Malformed lines are skipped for inference only; the reader turns
            # them into invalid_input rows.
            table = pa_csv.read_csv(
                io.BytesIO(head),
                parse_options=pa_csv.ParseOptions(
                    delimiter=delimiter, invalid_row_handler=lambda _: "skip"
                ),
            )
        else:
            table = pa_json.read_json(io.BytesIO(_json_objects(head)))
    except pa.ArrowInvalid as e:
        raise InputError(f"cannot read {path} as {fmt}: {e}") from e
    # Columns that are null in the sample get a string type rather than `null`.
    fields = [
        pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in table.schema
    ]
    return pa.schema(fields)


def _json_objects(head: bytes) -> bytes:
    """The lines of `head` that are JSON objects (bad lines become error rows later)."""
    good = []
    for line in head.splitlines():
        try:
            if isinstance(json.loads(line), dict):
                good.append(line)
        except ValueError:
            continue
    if not good:
        raise InputError("no line in the first block is a JSON object")
    return b"\n".join(good) + b"\n"


def choose_uri_column(schema: pa.Schema, requested: str | None, source: str) -> str:
    """The URI column: the requested one, else the first known name present."""
    if requested:
        if requested not in schema.names:
            raise InputError(
                f"--uri-column {requested!r} is not a column of {source}; "
                f"its columns are {schema.names}"
            )
        chosen = requested
    else:
        candidates = [c for c in URI_COLUMN_CANDIDATES if c in schema.names]
        if not candidates:
            raise InputError(
                f"{source} has no URI column: looked for {list(URI_COLUMN_CANDIDATES)} "
                f"among {schema.names}; name it with --uri-column"
            )
        chosen = candidates[0]
        if chosen != "uri":
            logger.info("Using column %r of %s as the image URI column", chosen, source)
    if not (
        pa.types.is_string(schema.field(chosen).type)
        or pa.types.is_large_string(schema.field(chosen).type)
    ):
        raise InputError(
            f"URI column {chosen!r} of {source} has type {schema.field(chosen).type}, "
            "expected strings"
        )
    return chosen


def is_image_type(type_: pa.DataType) -> bool:
    """A binary column, or a struct with a binary `bytes` field (HF datasets' Image)."""
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_):
        return True
    if pa.types.is_struct(type_):
        index = type_.get_field_index("bytes")
        if index >= 0:
            inner = type_.field(index).type
            return bool(pa.types.is_binary(inner) or pa.types.is_large_binary(inner))
    return False


_IMAGE_NAMES = ("image", "img", "image_bytes", "jpg", "png", "bytes")


def choose_image_column(schema: pa.Schema, requested: str | None, source: str) -> str | None:
    """The embedded-image column: the requested one, else an auto-detected one."""
    if requested:
        if requested not in schema.names:
            raise InputError(
                f"--image-column {requested!r} is not a column of {source}; "
                f"its columns are {schema.names}"
            )
        if not is_image_type(schema.field(requested).type):
            raise InputError(
                f"--image-column {requested!r} of {source} has type "
                f"{schema.field(requested).type}; expected binary or a struct with a "
                "'bytes' field"
            )
        return requested
    candidates = [f.name for f in schema if is_image_type(f.type)]
    if not candidates:
        return None
    named = [c for c in candidates if c.lower() in _IMAGE_NAMES]
    chosen = (named or candidates)[0]
    logger.info(
        "Using column %r of %s as the embedded image column (%s)",
        chosen,
        source,
        schema.field(chosen).type,
    )
    return chosen


def plan_input(
    pattern: str,
    *,
    uri_column: str | None = None,
    image_column: str | None = None,
    keep_image_column: bool = False,
    input_format: str = "auto",
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

    Raises:
        InputError: when the input cannot be used; the message says why.
    """
    files = match_files(pattern)
    formats = {detect_format(f) for f in files} if input_format == "auto" else {input_format}
    if len(formats) > 1:
        raise InputError(f"--input {pattern} mixes formats {sorted(formats)}; pass one format")
    fmt = formats.pop()
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}; expected one of {FORMATS}")
    delimiter = "\t" if _strip_compression(files[0]).lower().endswith(".tsv") else ","
    schema = _infer_schema(files[0], fmt, delimiter)
    if image_column and fmt != "parquet":
        raise InputError("--image-column needs Parquet input")
    if fmt == "parquet" and (image_column or not uri_column):
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
    return InputPlan(tuple(files), fmt, chosen, schema, delimiter)


def resolve_uri(uri: str, base_dir: str) -> str:
    """Resolve a manifest entry against the manifest's folder.

    Absolute paths and URIs with a scheme are returned as they are.
    """
    if "://" in uri or uri.startswith("/") or not uri:
        return uri
    if "://" in base_dir:
        return posixpath.join(base_dir, uri)
    return posixpath.normpath(posixpath.join(base_dir, uri))


def _base_dir(path: str) -> str:
    return posixpath.dirname(path)


def _to_text(value: Any) -> str | None:
    if value is None:
        return None
    return str(value).strip()


def _coerce(values: dict[str, Any], schema: pa.Schema) -> str | None:
    """Check each value against its column type in place; return a problem, if any."""
    for f in schema:
        v = values.get(f.name)
        if v is None:
            continue
        try:
            pa.array([v], type=f.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            values[f.name] = None
            return f"column {f.name!r}: {v!r} is not {f.type}"
    return None


class _ReadRows(beam.DoFn):
    """Reads one work unit (a file, or a Parquet row group) into `ImageRow`s."""

    def __init__(self, plan: InputPlan) -> None:
        self._plan = plan

    def process(self, unit: tuple[int, str, int]) -> Iterator[ImageRow]:
        file_no, path, row_group = unit
        base = _base_dir(path)
        reader = {
            "text": self._text,
            "csv": self._csv,
            "jsonl": self._jsonl,
            "parquet": self._parquet,
        }[self._plan.format]
        image_column = self._plan.image_column
        for row_no, values, error in reader(path, row_group):
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
                else:
                    image = cell
                if image is None and not raw and error is None:
                    error = RowError(
                        ErrorCode.EMPTY_URI, f"column {image_column!r} has no bytes and no path"
                    )
            uri = resolve_uri(raw, base) if raw else raw
            yield ImageRow(
                index=f"{file_no}:{row_no}", uri=uri, values=values, error=error, image=image
            )

    def _text(self, path: str, _: int) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
            for line_no, line in enumerate(f, start=1):
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                yield line_no, {TEXT_URI_COLUMN: entry}, None

    def _csv(self, path: str, _: int) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
        schema = self._plan.schema
        with fsspec.open(path, "rt", encoding="utf-8", newline="", compression="infer") as f:
            reader = csv.reader(f, delimiter=self._plan.delimiter)
            header = next(reader, None)
            if header is None:
                return
            for cells in reader:
                row_no = reader.line_num
                if not cells:
                    continue
                record = dict(zip(header, cells, strict=False))
                values: dict[str, Any] = {}
                problem = None
                if len(cells) != len(header):
                    problem = f"{len(cells)} fields where the header has {len(header)}"
                for f_ in schema:
                    value, bad = _parse_csv_cell(record.get(f_.name), f_)
                    values[f_.name] = value
                    problem = problem or bad
                error = (
                    RowError(ErrorCode.MALFORMED_ROW, f"{path} line {row_no}: {problem}")
                    if problem
                    else None
                )
                yield row_no, values, error

    def _jsonl(self, path: str, _: int) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
        schema = self._plan.schema
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                except ValueError as e:
                    yield (
                        line_no,
                        {},
                        RowError(ErrorCode.MALFORMED_ROW, f"{path} line {line_no}: {e}"),
                    )
                    continue
                values = {name: obj.get(name) for name in schema.names}
                problem = _coerce(values, schema)
                error = (
                    RowError(ErrorCode.MALFORMED_ROW, f"{path} line {line_no}: {problem}")
                    if problem
                    else None
                )
                yield line_no, values, error

    def _parquet(
        self, path: str, row_group: int
    ) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
        schema = self._plan.schema
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            offset = sum(pf.metadata.row_group(i).num_rows for i in range(row_group))
            missing = [n for n in schema.names if n not in pf.schema_arrow.names]
            if missing:
                raise InputError(f"{path} lacks column(s) {missing} found in the first file")
            for batch in pf.iter_batches(
                batch_size=parquet_batch_rows(pf.metadata.row_group(row_group)),
                row_groups=[row_group],
                columns=schema.names,
            ):
                table = pa.Table.from_batches([batch]).select(schema.names)
                if table.schema != schema:
                    table = table.cast(schema)
                for values in table.to_pylist():
                    yield offset, values, None
                    offset += 1


def parquet_batch_rows(row_group: Any, target_bytes: int = PARQUET_READ_BATCH_BYTES) -> int:
    """Rows per read batch so one batch holds about `target_bytes` (images inside)."""
    rows = max(int(row_group.num_rows), 1)
    per_row = max(int(row_group.total_byte_size) // rows, 1)
    return max(1, min(PARQUET_READ_BATCH_ROWS, target_bytes // per_row))


# pyarrow's default CSV null spellings, which its type inference also used.
_CSV_NULLS = frozenset(pa_csv.ConvertOptions().null_values)


def _parse_csv_cell(cell: str | None, field: pa.Field) -> tuple[Any, str | None]:
    """Convert one CSV cell to its column's inferred type: (value, problem)."""
    if cell is None:
        return None, None
    if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
        return cell, None
    if cell in _CSV_NULLS:
        return None, None
    try:
        return pa.scalar(cell, pa.string()).cast(field.type).as_py(), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None, f"column {field.name!r}: {cell!r} is not {field.type}"


class _SplitUnits(beam.DoFn):
    """Turns a file into work units: one per Parquet row group, one per manifest."""

    def __init__(self, plan: InputPlan) -> None:
        self._plan = plan

    def process(self, item: tuple[int, str]) -> Iterator[tuple[int, str, int]]:
        file_no, path = item
        if self._plan.format != "parquet":
            yield file_no, path, 0
            return
        with fsspec.open(path, "rb") as f:
            groups = pq.ParquetFile(f).metadata.num_row_groups
        for group in range(groups):
            yield file_no, path, group


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
        rows = (
            pbegin
            | "ListFiles" >> beam.Create(list(enumerate(self._plan.files)))
            | "SplitUnits" >> beam.ParDo(_SplitUnits(self._plan))
            # Spread row groups over workers before reading them.
            | "SpreadUnits" >> beam.Reshuffle()
            | "ReadRows" >> beam.ParDo(_ReadRows(self._plan))
        )
        if self._plan.image_column:
            # Rows carry image bytes: shuffling them would copy every image and,
            # on a local runner, hold them all in memory. Row groups are spread.
            return rows
        # A manifest file is read by one worker; spread its rows so fetching and
        # inference run everywhere (Dataflow fuses steps otherwise).
        return rows | "SpreadRows" >> beam.Reshuffle()


def count_rows(plan: InputPlan, max_bytes: int = 256 << 20) -> int | None:
    """Row count for progress, when it is cheap to know; None otherwise.

    Parquet counts come from file footers. Local manifests are counted by lines
    (blank lines and `#` comments skipped) when they are not too large.
    """
    total = 0
    for path in plan.files:
        if plan.format == "parquet":
            with fsspec.open(path, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
            continue
        fs, local = fsspec.core.url_to_fs(path)
        if _protocol(path) != "file" or fs.size(local) > max_bytes:
            return None
        with fsspec.open(path, "rb", compression="infer") as f:
            lines = [line.strip() for line in f]
        entries = [
            line for line in lines if line and not (plan.format == "text" and line.startswith(b"#"))
        ]
        total += len(entries) - (1 if plan.format == "csv" and entries else 0)
    return total
