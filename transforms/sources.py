"""Reading image manifests (txt, CSV, JSONL), Parquet, Arrow (Hugging Face
`datasets`' `save_to_disk`), WebDataset tar shards and img2dataset output folders
into `ImageRow`s.

The input is planned once, when the job is built (`plan_input`): files are
matched, the format and the URI column are decided and the passthrough schema is
fixed, so a bad input fails before any worker starts. The `ReadImageRows`
transform then reads the planned files on the workers: Parquet is split by row
group so large inputs spread across workers, and every row is keyed by its
position.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from transforms import webdataset
from transforms.errors import ErrorCode, RowError, redact_uri
from transforms.rows import ImageRow

logger = logging.getLogger(__name__)

FORMATS = ("text", "csv", "jsonl", "parquet", "arrow", "webdataset", "img2dataset")
#: Formats whose rows come from Arrow tables: typed columns, rows counted by offset.
_TABULAR = ("parquet", "arrow", "img2dataset")
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
    ".arrow": "arrow",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".tar": "webdataset",
    ".tgz": "webdataset",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# Schema inference for CSV/JSONL looks at this much of the first file.
_INFER_BYTES = 4 << 20
# Parquet is read in record batches of this many rows, so a huge row group
# never sits in memory whole.
PARQUET_READ_BATCH_ROWS = 1024
PARQUET_READ_BATCH_BYTES = 32 << 20
#: Rows of an Arrow record batch turned into Python objects at a time.
ARROW_SLICE_ROWS = 64


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
    image_column: str | None = None  # Parquet with the images inside, or tar shards
    keep_image_column: bool = False
    encoding: str = "utf-8"  # text, CSV and JSONL manifests
    max_member_bytes: int = 50 << 20  # WebDataset members past this are too_large rows

    @property
    def image_path_column(self) -> str | None:
        """`<image column>_path`: an image struct's `path` kept as a column of its own
        when the struct itself is not copied to the output."""
        if not self.image_column or self.keep_image_column:
            return None
        type_ = self.schema.field(self.image_column).type
        if pa.types.is_struct(type_) and type_.get_field_index("path") >= 0:
            return f"{self.image_column}_path"
        return None

    @property
    def passthrough_schema(self) -> pa.Schema:
        """The input columns copied to the output (image bytes only when asked)."""
        if self.image_column and not self.keep_image_column:
            index = self.schema.get_field_index(self.image_column)
            schema = self.schema.remove(index)
            if self.image_path_column:
                schema = schema.insert(index, pa.field(self.image_path_column, pa.string()))
            return schema
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
    """Expand a path, glob, directory URI or WebDataset brace pattern
    (``shards/{000000..000099}.tar``) into a list of files.

    Globs and directories are sorted; a brace pattern keeps its own order. Local
    files named by a brace pattern must exist; remote ones are not listed one by
    one (a missing shard becomes a `not_found` row).
    """
    if webdataset.is_shard_pattern(pattern):
        expanded = webdataset.expand_braces(pattern)
        found: list[str] = []
        for path in expanded:
            if _protocol(path) == "file" and not any(ch in path for ch in "*?["):
                if not fsspec.filesystem("file").isfile(path):
                    raise InputError(f"--input {pattern}: {path} does not exist")
                found.append(path)
            elif any(ch in path for ch in "*?["):
                found.extend(match_files(path))
            else:
                found.append(path)
        return found
    fs, _, _ = fsspec.get_fs_token_paths(pattern)
    if _protocol(pattern) in ("http", "https"):
        return [pattern]
    if any(ch in pattern for ch in "*?["):
        found = [p for p in fs.glob(pattern) if not fs.isdir(p)]
    elif fs.isdir(pattern):
        listed = fs.find(pattern)
        # A Hugging Face `save_to_disk` folder holds Arrow files (one per split).
        found = [p for p in listed if detect_format(p) == "parquet"] or [
            p for p in listed if detect_format(p) == "arrow"
        ]
        if not found:
            raise InputError(
                f"--input {pattern} is a directory with no *.parquet or *.arrow files; "
                "point it at a manifest file or a glob such as 'dir/*.csv'"
            )
    elif fs.exists(pattern):
        found = [pattern]
    else:
        raise InputError(f"--input {pattern} does not exist")
    if not found:
        raise InputError(f"--input {pattern} matches no files")
    return sorted(with_protocol(pattern, p) for p in found)


def _open_lines(path: str) -> Any:
    """A buffered binary stream of a (possibly compressed) manifest, for `readline(limit)`."""
    return fsspec.open(path, "rb", compression="infer")


def _buffered(f: Any) -> Any:
    if isinstance(f, io.BufferedIOBase):
        return f
    return io.BufferedReader(f, buffer_size=1 << 20)


def _read_head(path: str, limit: int | None = None) -> bytes:
    limit = limit or _INFER_BYTES
    with _open_lines(path) as f:
        head: bytes = f.read(limit)
        if len(head) == limit:  # cut at the last full line
            head = head[: head.rfind(b"\n") + 1]
        return head


def _check_header(header: list[str], path: str) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise InputError(
                f"{path} has the column {name!r} twice in its header; rename one (a duplicate "
                "column would silently overwrite the other)"
            )
        seen.add(name)
    if any(not name.strip() for name in header):
        raise InputError(f"{path} has an empty column name in its header")


def _infer_schema(path: str, fmt: str, delimiter: str, encoding: str = "utf-8") -> pa.Schema:
    if fmt == "text":
        return pa.schema([pa.field(TEXT_URI_COLUMN, pa.string())])
    if fmt == "parquet":
        with fsspec.open(path, "rb") as f:
            schema: pa.Schema = pq.read_schema(f)
        return schema.remove_metadata()
    # Type inference only: undecodable bytes become U+FFFD here; the reader turns
    # their rows into error rows.
    text = _decode_head(_read_head(path), encoding)
    if fmt == "csv":
        first = next(csv.reader(io.StringIO(text), delimiter=delimiter), None)
        if not first:
            raise InputError(f"{path} has no header line")
        _check_header(first, path)
        try:
            data = text.encode("utf-8")
            table = pa_csv.read_csv(
                io.BytesIO(data),
                read_options=pa_csv.ReadOptions(block_size=max(len(data) + 1, 1 << 20)),
                # Malformed lines are skipped for inference only; the reader turns
                # them into invalid_input rows.
                parse_options=pa_csv.ParseOptions(
                    delimiter=delimiter, invalid_row_handler=lambda _: "skip"
                ),
            )
        except pa.ArrowInvalid as e:
            raise InputError(f"cannot read {path} as csv: {e}") from e
        fields = list(table.schema)
    else:
        fields = _infer_json_fields(text, path)
    # Columns that are null in the sample get a string type rather than `null`.
    return pa.schema(
        [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in fields]
    )


def _is_utf8(encoding: str) -> bool:
    return encoding.replace("-", "").replace("_", "").lower() in ("utf8", "utf8sig")


def _decode_head(head: bytes, encoding: str) -> str:
    if head.startswith(codecs.BOM_UTF8) and _is_utf8(encoding):
        head = head[len(codecs.BOM_UTF8) :]
    return head.decode(encoding, errors="replace")


def _infer_json_fields(text: str, path: str) -> list[pa.Field]:
    """Column types of JSONL from the sample, one column at a time.

    A column whose values disagree (1 on one line, "x" on another) takes the
    type of its first non-null value; lines that do not fit become error rows
    when read. One bad line never refuses the job.
    """
    columns: dict[str, list[Any]] = {}
    objects = 0
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        objects += 1
        for key, value in obj.items():
            columns.setdefault(str(key), []).append(value)
    if not objects:
        raise InputError(f"{path}: no line in the first block is a JSON object")
    fields = []
    for name, values in columns.items():
        fields.append(pa.field(name, _json_type(values)))
    return fields


def _json_type(values: list[Any]) -> pa.DataType:
    present = [v for v in values if v is not None]
    if not present:
        return pa.string()
    try:
        return pa.array(present).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        for value in present:
            try:
                return pa.array([value]).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                continue
        return pa.string()


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
    sidecars = img2dataset_sidecars(pattern) if input_format in ("auto", "img2dataset") else None
    if sidecars:
        if uri_column or image_column:
            flag = "--uri-column" if uri_column else "--image-column"
            raise InputError(
                f"{flag} does not apply to an img2dataset folder: each row's image is its "
                "sample in the shard beside it"
            )
        schema = unify_parquet_schemas(sidecars)
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
        schema = unify_parquet_schemas(files)
    elif fmt == "arrow":
        schema = unify_arrow_schemas(files)
    else:
        schema = _infer_schema(files[0], fmt, delimiter, encoding)
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


#: img2dataset's output folder: `00000.tar` shards with a `00000.parquet` of every
#: row (failed downloads included) beside each, and `*_stats.json`.
_IMG2DATASET_SHARD = re.compile(r"^(\d+)\.tar$")
#: The column that carries an img2dataset row's image from its shard to the labeler.
IMG2DATASET_IMAGE = "image"


def img2dataset_sidecars(pattern: str) -> list[str] | None:
    """The per-shard Parquet files of an img2dataset folder, or None for anything else.

    An img2dataset folder is a directory whose `NNNNN.tar` shards each have a
    `NNNNN.parquet` beside them. Its rows are the Parquet files' rows, so the
    downloads that failed (in no shard) are rows too.
    """
    if webdataset.is_shard_pattern(pattern) or any(ch in pattern for ch in "*?["):
        return None
    fs, _, _ = fsspec.get_fs_token_paths(pattern)
    if _protocol(pattern) in ("http", "https") or not fs.isdir(pattern):
        return None
    names = {posixpath.basename(p): p for p in fs.ls(pattern, detail=False)}
    shards = sorted(n for n in names if _IMG2DATASET_SHARD.match(n))
    if not shards or any(n[: -len(".tar")] + ".parquet" not in names for n in shards):
        return None
    return [with_protocol(pattern, names[n[: -len(".tar")] + ".parquet"]) for n in shards]


def _open_arrow(f: Any) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow IPC file or stream (`datasets` writes streams)."""
    try:
        reader = pa.ipc.open_file(f)
    except pa.ArrowInvalid:
        f.seek(0)
        yield from pa.ipc.open_stream(f)
        return
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i)


def _arrow_schema(f: Any) -> pa.Schema:
    try:
        return pa.ipc.open_file(f).schema
    except pa.ArrowInvalid:
        f.seek(0)
        return pa.ipc.open_stream(f).schema


def unify_arrow_schemas(files: list[str]) -> pa.Schema:
    """One schema for Arrow IPC files (as `unify_parquet_schemas`)."""
    return _unify(files, _arrow_schema)


def unify_parquet_schemas(files: list[str]) -> pa.Schema:
    """One schema for Parquet files whose schemas differ.

    Types are promoted where arrow can (int32 and int64, int and float, string
    and large_string ...); a column missing from a file is null in its rows.

    Raises:
        InputError: naming the file and the column that cannot be unified.
    """
    return _unify(files, pq.read_schema)


def _unify(files: list[str], read_schema: Any) -> pa.Schema:
    schema: pa.Schema | None = None
    for path in files:
        with fsspec.open(path, "rb") as f:
            file_schema = read_schema(f).remove_metadata()
        if schema is None:
            schema = file_schema
            continue
        try:
            schema = pa.unify_schemas([schema, file_schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            match = re.search(r"[Ff]ield (\S+) has incompatible types", str(e))
            column = match.group(1) if match else "?"
            first_line = str(e).splitlines()[0]
            raise InputError(
                f"--input: {path} column {column!r} cannot be unified with the earlier "
                f"files ({first_line})"
            ) from None
    assert schema is not None
    return schema


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
            "arrow": self._arrow,
            "webdataset": self._webdataset,
            "img2dataset": self._img2dataset,
        }[self._plan.format]
        image_column = self._plan.image_column
        source_file = redact_uri(path)
        # Parquet readers yield 0-based row offsets; manifests count their rows.
        for position, (row_no, values, error) in enumerate(reader(path, row_group)):
            offsets = (*_TABULAR, "webdataset")
            source_row = row_no if self._plan.format in offsets else position
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

    def _text(self, path: str, _: int) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
        for line_no, line, error in read_lines(path, self._plan.encoding):
            if error is not None:
                yield line_no, {TEXT_URI_COLUMN: None}, error
                continue
            entry = (line or "").strip()
            if not entry or entry.startswith("#"):
                continue
            yield line_no, {TEXT_URI_COLUMN: entry}, None

    def _csv(self, path: str, _: int) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
        schema = self._plan.schema
        bad: dict[int, RowError] = {}

        def lines() -> Iterator[str]:
            for line_no, line, error in read_lines(path, self._plan.encoding, escape=True):
                if error is not None:
                    bad[line_no] = error
                    yield _BAD_LINE + "\n"  # keeps csv's line count; its record is an error
                else:
                    yield line or ""

        csv.field_size_limit(MAX_LINE_BYTES)
        reader = csv.reader(lines(), delimiter=self._plan.delimiter)
        header = next(reader, None)
        if header is None:
            return
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # e.g. an unclosed quote past the field limit
                yield reader.line_num, {}, _malformed(path, reader.line_num, str(e))
                continue
            row_no = reader.line_num
            if not cells:
                continue
            if any(has_bad_bytes(cell) for cell in cells):
                yield (
                    start,
                    {},
                    RowError(
                        ErrorCode.BAD_ENCODING,
                        f"{path} line {start}: bytes that are not valid {self._plan.encoding} "
                        "(see --input-encoding)",
                    ),
                )
                continue
            if any(_BAD_LINE in cell for cell in cells):
                first = min(n for n in bad if n <= row_no)
                error = bad[first]
                for n in [n for n in bad if n <= row_no]:
                    del bad[n]
                yield first, {}, error
                continue
            record = dict(zip(header, cells, strict=False))
            values: dict[str, Any] = {}
            problem = None
            if len(cells) != len(header):
                problem = f"{len(cells)} fields where the header has {len(header)}"
            for f_ in schema:
                value, wrong = _parse_csv_cell(record.get(f_.name), f_)
                values[f_.name] = value
                problem = problem or wrong
            yield row_no, values, _malformed(path, row_no, problem) if problem else None

    def _jsonl(self, path: str, _: int) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
        schema = self._plan.schema
        names = set(schema.names)
        for line_no, line, error in read_lines(path, self._plan.encoding):
            if error is not None:
                yield line_no, {}, error
                continue
            if not (line or "").strip():
                continue
            try:
                obj = json.loads(line or "")
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except RecursionError:
                yield line_no, {}, _malformed(path, line_no, "JSON nested too deeply")
                continue
            except ValueError as e:
                yield line_no, {}, _malformed(path, line_no, f"invalid JSON: {e}")
                continue
            unknown = sorted(str(k) for k in obj if k not in names)
            values = {name: obj.get(name) for name in schema.names}
            problem: str | None = _coerce(values, schema)
            if unknown and not problem:
                shown = ", ".join(repr(k[:40]) for k in unknown[:5])
                problem = f"unknown key(s) {shown} (the columns are {schema.names[:20]})"
            yield line_no, values, _malformed(path, line_no, problem) if problem else None

    def _webdataset(
        self, path: str, _: int
    ) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
        return webdataset.read_shard(path, self._plan.max_member_bytes)

    def _parquet(
        self, path: str, row_group: int
    ) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
        schema = self._plan.schema
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            offset = sum(pf.metadata.row_group(i).num_rows for i in range(row_group))
            present = [n for n in schema.names if n in pf.schema_arrow.names]
            for batch in pf.iter_batches(
                batch_size=parquet_batch_rows(pf.metadata.row_group(row_group)),
                row_groups=[row_group],
                columns=present,
            ):
                for values in _conform(pa.Table.from_batches([batch]), schema).to_pylist():
                    yield offset, values, None
                    offset += 1

    def _arrow(self, path: str, _: int) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
        schema = self._plan.schema
        offset = 0
        with fsspec.open(path, "rb") as f:
            for batch in _open_arrow(f):
                # `datasets` writes 1,000-row batches: images go to Python a slice at a time.
                for start in range(0, batch.num_rows, PARQUET_READ_BATCH_ROWS // 16):
                    piece = pa.Table.from_batches(
                        [batch.slice(start, PARQUET_READ_BATCH_ROWS // 16)]
                    )
                    for values in _conform(piece, schema).to_pylist():
                        yield offset, values, None
                        offset += 1

    def _img2dataset(
        self, path: str, _: int
    ) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
        """The rows of one img2dataset shard: its Parquet's rows, with their images
        from the tar beside it. A row whose download failed (no sample in the
        shard) is a `no_image` row naming img2dataset's status and error."""
        schema = self._plan.schema.remove(self._plan.schema.get_field_index(IMG2DATASET_IMAGE))
        with fsspec.open(path, "rb") as f:
            rows = _conform(pq.read_table(f), schema).to_pylist()
        by_key = {row.get("key"): i for i, row in enumerate(rows)}
        shard = path[: -len(".parquet")] + ".tar"
        done: set[int] = set()
        extra = len(rows)
        shard_error: RowError | None = None
        for _, sample, error in webdataset.read_shard(shard, self._plan.max_member_bytes):
            i = by_key.get(sample["__key__"])
            if i is None and sample["__key__"] is None:  # the shard could not be read on
                shard_error = error
                continue
            if i is None or i in done:  # a sample the Parquet does not list: a row too
                values = dict.fromkeys(schema.names) | {"key": sample["__key__"]}
                yield extra, values | {IMG2DATASET_IMAGE: sample[webdataset.IMAGE_COLUMN]}, error
                extra += 1
                continue
            done.add(i)
            yield i, rows[i] | {IMG2DATASET_IMAGE: sample[webdataset.IMAGE_COLUMN]}, error
        for i, row in enumerate(rows):
            if i in done:
                continue
            if shard_error is not None and row.get("status") == "success":
                yield i, row | {IMG2DATASET_IMAGE: None}, shard_error
                continue
            upstream = ": ".join(str(row[k]) for k in ("status", "error_message") if row.get(k))
            message = (
                f"img2dataset row {i} (key {row.get('key')!r}) is in no sample of "
                f"{redact_uri(shard)}"
            )
            yield (
                i,
                row | {IMG2DATASET_IMAGE: None},
                RowError(ErrorCode.NO_IMAGE, f"{message}: {upstream or 'no status'}"),
            )


#: Longest manifest line read (and longest CSV field); a longer line becomes a
#: `line_too_long` error row and is skipped in chunks, so memory stays bounded.
MAX_LINE_BYTES = 16 << 20
_BAD_LINE = "\x00image-labeler-bad-line\x00"


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns in its order: missing ones null, types cast."""
    for name in schema.names:  # columns of other files: null here
        if name not in table.column_names:
            table = table.append_column(
                schema.field(name), pa.nulls(len(table), schema.field(name).type)
            )
    table = table.select(schema.names)
    return table if table.schema == schema else table.cast(schema)


def _malformed(path: str, line_no: int, problem: str) -> RowError:
    return RowError(ErrorCode.MALFORMED_ROW, f"{path} line {line_no}: {problem}")


def read_lines(
    path: str, encoding: str = "utf-8", max_bytes: int | None = None, *, escape: bool = False
) -> Iterator[tuple[int, str | None, RowError | None]]:
    """The physical lines of a manifest: (line number, text, None) or (line number,
    None, error) for a line that is too long or not valid in `encoding`.

    At most `max_bytes` (default `MAX_LINE_BYTES`) of a line are held in memory;
    a UTF-8 byte-order mark at the start is dropped. With `escape`, undecodable
    bytes become lone surrogates instead of an error (`has_bad_bytes` finds them),
    so a CSV record that spans lines keeps its shape.
    """
    limit = max_bytes or MAX_LINE_BYTES
    utf8 = _is_utf8(encoding)
    errors = "surrogateescape" if escape else "strict"
    with _open_lines(path) as raw:
        f = _buffered(raw)
        line_no = 0
        while True:
            line = f.readline(limit + 1)
            if not line:
                return
            line_no += 1
            if line_no == 1 and utf8 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8) :]
            if len(line) > limit:
                while not line.endswith(b"\n"):  # skip the rest, a chunk at a time
                    line = f.readline(1 << 20)
                    if not line:
                        break
                yield (
                    line_no,
                    None,
                    RowError(
                        ErrorCode.LINE_TOO_LONG,
                        f"{path} line {line_no}: longer than the {limit} byte line limit",
                    ),
                )
                continue
            try:
                yield (
                    line_no,
                    line.decode(encoding, errors),
                    None,
                )
            except UnicodeDecodeError as e:
                yield (
                    line_no,
                    None,
                    RowError(
                        ErrorCode.BAD_ENCODING,
                        f"{path} line {line_no}: bytes at offset {e.start} are not valid "
                        f"{encoding} (see --input-encoding)",
                    ),
                )


_ESCAPED = re.compile("[\udc80-\udcff]")


def has_bad_bytes(text: str) -> bool:
    """Whether `read_lines(escape=True)` met undecodable bytes in this text."""
    return _ESCAPED.search(text) is not None


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


def read_rows_here(plan: InputPlan, max_bytes: int = 256 << 20) -> Iterator[ImageRow] | None:
    """The planned input's rows, read in this process when that is cheap: local
    files of at most `max_bytes` in all. None otherwise."""
    size = 0
    for path in plan.files:
        if _protocol(path) != "file":
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

    Parquet counts come from file footers. Local manifests are counted by lines
    (blank lines and `#` comments skipped) when they are not too large; lines
    are streamed, so a huge line costs no memory.
    """
    total = 0
    for path in plan.files:
        if plan.format in ("parquet", "img2dataset"):
            with fsspec.open(path, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
            continue
        if plan.format == "arrow":
            if _protocol(path) != "file":
                return None
            with pa.memory_map(path) as f:  # batch headers only; the data stays on disk
                total += sum(batch.num_rows for batch in _open_arrow(f))
            continue
        if plan.format == "webdataset":
            # Uncompressed local shards only: count_samples gives None for the others.
            count = webdataset.count_samples(path) if _protocol(path) == "file" else None
            if count is None:
                return None
            total += count
            continue
        fs, local = fsspec.core.url_to_fs(path)
        if _protocol(path) != "file" or fs.size(local) > max_bytes:
            return None
        entries = 0
        for _, line, error in read_lines(path, plan.encoding):
            text = (line or "").strip()
            if error is not None or (text and not (plan.format == "text" and text[0] == "#")):
                entries += 1
        total += entries - (1 if plan.format == "csv" and entries else 0)
    return total
