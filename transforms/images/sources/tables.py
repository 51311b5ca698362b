"""Arrow tables: Parquet files, Arrow IPC files (Hugging Face `datasets`'
`save_to_disk`) and img2dataset output folders (Parquet beside tar shards).

Rows come from typed columns and are numbered by their offset in the file.
Parquet is read a row group at a time, in record batches of bounded size, so a
huge row group never sits in memory whole and row groups spread over workers.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.errors import ErrorCode, RowError, redact_uri
from transforms.images.sources import webdataset
from transforms.images.sources.plan import InputError, InputPlan, Reader, Rows
from transforms.uri import scheme_of, with_protocol

# Parquet is read in record batches of this many rows, so a huge row group
# never sits in memory whole.
PARQUET_READ_BATCH_ROWS = 1024


PARQUET_READ_BATCH_BYTES = 32 << 20


#: Rows of an Arrow record batch turned into Python objects at a time.
ARROW_SLICE_ROWS = 64


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
    if scheme_of(pattern) in ("http", "https") or not fs.isdir(pattern):
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


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns in its order: missing ones null, types cast."""
    for name in schema.names:  # columns of other files: null here
        if name not in table.column_names:
            table = table.append_column(
                schema.field(name), pa.nulls(len(table), schema.field(name).type)
            )
    table = table.select(schema.names)
    return table if table.schema == schema else table.cast(schema)


def parquet_batch_rows(row_group: Any, target_bytes: int = PARQUET_READ_BATCH_BYTES) -> int:
    """Rows per read batch so one batch holds about `target_bytes` (images inside)."""
    rows = max(int(row_group.num_rows), 1)
    per_row = max(int(row_group.total_byte_size) // rows, 1)
    return max(1, min(PARQUET_READ_BATCH_ROWS, target_bytes // per_row))


def read_parquet(plan: InputPlan, path: str, row_group: int) -> Rows:
    schema = plan.schema
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


def read_arrow(plan: InputPlan, path: str, _: int) -> Rows:
    schema = plan.schema
    offset = 0
    with fsspec.open(path, "rb") as f:
        for batch in _open_arrow(f):
            # `datasets` writes 1,000-row batches: images go to Python a slice at a time.
            for start in range(0, batch.num_rows, ARROW_SLICE_ROWS):
                piece = pa.Table.from_batches([batch.slice(start, ARROW_SLICE_ROWS)])
                for values in _conform(piece, schema).to_pylist():
                    yield offset, values, None
                    offset += 1


def read_img2dataset(plan: InputPlan, path: str, _: int) -> Rows:
    """The rows of one img2dataset shard: its Parquet's rows, with their images
    from the tar beside it. A row whose download failed (no sample in the
    shard) is a `no_image` row naming img2dataset's status and error."""
    schema = plan.schema.remove(plan.schema.get_field_index(IMG2DATASET_IMAGE))
    with fsspec.open(path, "rb") as f:
        rows = _conform(pq.read_table(f), schema).to_pylist()
    by_key = {row.get("key"): i for i, row in enumerate(rows)}
    shard = path[: -len(".parquet")] + ".tar"
    done: set[int] = set()
    extra = len(rows)
    shard_error: RowError | None = None
    for _, sample, error in webdataset.read_shard(shard, plan.max_member_bytes):
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
            f"img2dataset row {i} (key {row.get('key')!r}) is in no sample of {redact_uri(shard)}"
        )
        yield (
            i,
            row | {IMG2DATASET_IMAGE: None},
            RowError(ErrorCode.NO_IMAGE, f"{message}: {upstream or 'no status'}"),
        )


def row_groups(plan: InputPlan, path: str) -> int:
    """A Parquet file is read a row group per work unit."""
    with fsspec.open(path, "rb") as f:
        return int(pq.ParquetFile(f).metadata.num_row_groups)


def count_parquet(plan: InputPlan, path: str, max_bytes: int) -> int | None:
    """From the file's footer."""
    with fsspec.open(path, "rb") as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def count_arrow(plan: InputPlan, path: str, max_bytes: int) -> int | None:
    """Local files only: batch headers are read, the data stays on disk."""
    if scheme_of(path) != "file":
        return None
    with pa.memory_map(path) as f:
        return sum(batch.num_rows for batch in _open_arrow(f))


PARQUET = Reader(read=read_parquet, count=count_parquet, units=row_groups, by_offset=True)
ARROW = Reader(read=read_arrow, count=count_arrow, by_offset=True)
IMG2DATASET = Reader(read=read_img2dataset, count=count_parquet, by_offset=True)
