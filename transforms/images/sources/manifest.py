"""Manifests: plain-text lists of URIs, CSV/TSV and JSONL, possibly compressed.

Lines are streamed with a length limit, so a huge or binary line costs no
memory: it becomes an error row. Column types of CSV and JSONL come from the
first few megabytes; a line that does not fit them is a `malformed_row`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv

from transforms.errors import ErrorCode, RowError
from transforms.images.sources.plan import TEXT_URI_COLUMN, InputError, InputPlan, Reader, Rows
from transforms.uri import scheme_of

# Schema inference for CSV/JSONL looks at this much of the first file.
_INFER_BYTES = 4 << 20


#: Longest manifest line read (and longest CSV field); a longer line becomes a
#: `line_too_long` error row and is skipped in chunks, so memory stays bounded.
MAX_LINE_BYTES = 16 << 20


_BAD_LINE = "\x00image-labeler-bad-line\x00"


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


def infer_schema(path: str, fmt: str, delimiter: str, encoding: str = "utf-8") -> pa.Schema:
    """The columns of a manifest, from the head of its first file."""
    if fmt == "text":
        return pa.schema([pa.field(TEXT_URI_COLUMN, pa.string())])
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


def read_text(plan: InputPlan, path: str, _: int) -> Rows:
    for line_no, line, error in read_lines(path, plan.encoding):
        if error is not None:
            yield line_no, {TEXT_URI_COLUMN: None}, error
            continue
        entry = (line or "").strip()
        if not entry or entry.startswith("#"):
            continue
        yield line_no, {TEXT_URI_COLUMN: entry}, None


def read_csv(plan: InputPlan, path: str, _: int) -> Rows:
    schema = plan.schema
    bad: dict[int, RowError] = {}

    def lines() -> Iterator[str]:
        for line_no, line, error in read_lines(path, plan.encoding, escape=True):
            if error is not None:
                bad[line_no] = error
                yield _BAD_LINE + "\n"  # keeps csv's line count; its record is an error
            else:
                yield line or ""

    csv.field_size_limit(MAX_LINE_BYTES)
    reader = csv.reader(lines(), delimiter=plan.delimiter)
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
                    f"{path} line {start}: bytes that are not valid {plan.encoding} "
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


def read_jsonl(plan: InputPlan, path: str, _: int) -> Rows:
    schema = plan.schema
    names = set(schema.names)
    for line_no, line, error in read_lines(path, plan.encoding):
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


def count_entries(plan: InputPlan, path: str, max_bytes: int) -> int | None:
    """Rows of a local manifest of at most `max_bytes`, by its lines: blank
    lines, `#` comments of text manifests and a CSV header not counted. Lines
    are streamed, so a huge line costs no memory. None for other manifests."""
    fs, local = fsspec.core.url_to_fs(path)
    if scheme_of(path) != "file" or fs.size(local) > max_bytes:
        return None
    entries = 0
    for _, line, error in read_lines(path, plan.encoding):
        text = (line or "").strip()
        if error is not None or (text and not (plan.format == "text" and text[0] == "#")):
            entries += 1
    return entries - (1 if plan.format == "csv" and entries else 0)


TEXT = Reader(read=read_text, count=count_entries)
CSV = Reader(read=read_csv, count=count_entries)
JSONL = Reader(read=read_jsonl, count=count_entries)
