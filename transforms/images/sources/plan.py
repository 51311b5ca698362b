"""The input plan: which files, which format, which columns, decided once.

`plan_input` (in `transforms.images.sources.read`) builds an `InputPlan` when
the job is built, so a bad input fails before any worker starts. This module
holds what every format shares: the plan itself, the `Reader` each format
provides, file matching and the choice of the URI and image columns.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa

from transforms.errors import RowError
from transforms.images.sources import webdataset
from transforms.uri import scheme_of, with_protocol

logger = logging.getLogger(__name__)

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


#: (row number, column values, the row's error or None), as a reader yields them.
Rows = Iterator[tuple[int, dict[str, Any], RowError | None]]


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


def one_unit(plan: InputPlan, path: str) -> int:
    """A file is read as one work unit."""
    return 1


@dataclass(frozen=True)
class Reader:
    """How the workers read one input format.

    Attributes:
        read: (plan, file, unit) -> the unit's rows.
        count: (plan, file, max_bytes) -> the file's row count for progress,
            None when it is not cheap to know.
        units: (plan, file) -> how many work units the file splits into
            (Parquet: one per row group).
        by_offset: a row's number is its offset in the file (its `source_row`);
            otherwise rows are numbered by their position among the rows read.
    """

    read: Callable[[InputPlan, str, int], Rows]
    count: Callable[[InputPlan, str, int], int | None]
    units: Callable[[InputPlan, str], int] = one_unit
    by_offset: bool = False


def _strip_compression(path: str) -> str:
    for ext in _COMPRESSIONS:
        if path.lower().endswith(ext):
            return path[: -len(ext)]
    return path


def _extension(path: str) -> str:
    return posixpath.splitext(_strip_compression(path).lower())[1]


def detect_format(path: str) -> str:
    """The input format implied by a file name (compression suffixes ignored)."""
    return _EXTENSIONS.get(_extension(path), "text")


def is_image_file(path: str) -> bool:
    """Whether a file name is an image's (any extension Pillow reads). Pillow's
    registry (20 ms to load every plugin) is read only for a name that no
    input format claims."""
    ext = _extension(path)
    if ext in _EXTENSIONS:
        return False
    from PIL import Image

    return ext in Image.registered_extensions()


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
            if scheme_of(path) == "file" and not any(ch in path for ch in "*?["):
                if not fsspec.filesystem("file").isfile(path):
                    raise InputError(f"--input {pattern}: {path} does not exist")
                found.append(path)
            elif any(ch in path for ch in "*?["):
                found.extend(match_files(path))
            else:
                found.append(path)
        return found
    fs, _, _ = fsspec.get_fs_token_paths(pattern)
    if scheme_of(pattern) in ("http", "https"):
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
