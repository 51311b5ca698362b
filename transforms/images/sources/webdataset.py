"""WebDataset tar shards as input: one row per sample, streamed, never extracted.

A WebDataset shard (LAION, DataComp, img2dataset output) is a plain tar whose
members are grouped into samples by key: ``000123.jpg``, ``000123.json`` and
``000123.txt`` are one sample with key ``000123``. The key is the member path
up to the first dot of its file name, the rest is its suffix, and a sample is
a run of consecutive members with the same key, exactly as `webdataset`'s
`tar_file_expander` and `group_by_keys` split them.

Each sample becomes one row:

- ``__key__`` and ``__url__`` (the shard, redacted like every URI we write);
- the image member (the first of ``jpg``, ``jpeg``, ``png``, ``webp``) as the
  image to label;
- a ``.json`` member as the ``json`` column (a string), ``.txt`` and ``.cls``
  members as the ``txt`` and ``cls`` columns (strings, as stored).

A sample without an image member is a `no_image` row; a shard that stops being
a readable tar is a `bad_shard` row after the samples read before the damage;
a member larger than the byte limit is a `too_large` row. Shards are read as
streams (gzip-compressed shards too), so a shard is never held in memory or
written to disk, and a shard is the unit of parallelism.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Iterator
from typing import IO, Any

import pyarrow as pa

from transforms.errors import ErrorCode, RowError, Status, redact_uri

logger = logging.getLogger(__name__)

#: Image member suffixes, in order of preference when a sample has several.
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
#: Member suffixes that become string columns.
TEXT_SUFFIXES = ("json", "txt", "cls")
#: The hidden column that carries the image bytes from the reader to the labeler.
IMAGE_COLUMN = "image"

SCHEMA = pa.schema(
    [
        pa.field("__key__", pa.string()),
        pa.field("__url__", pa.string()),
        *(pa.field(suffix, pa.string()) for suffix in TEXT_SUFFIXES),
        pa.field(IMAGE_COLUMN, pa.binary()),
    ]
)

# webdataset's `base_plus_ext`: the key is everything up to the first dot of the
# file name (directories included), the suffix everything after it.
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
# webdataset skips metadata members such as __index__ and hidden files.
_SKIPPED = re.compile(r"(^|/)(__[^/]*__|\.[^/]*)$")


def is_shard_pattern(pattern: str) -> bool:
    """A brace pattern as WebDataset writes it (``shards/{000000..000099}.tar``)."""
    return bool(re.search(r"\{[^{}]*(,|\.\.)[^{}]*\}", pattern))


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000000..000099}`` ranges and ``{a,b}`` lists, in order."""
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def split_name(name: str) -> tuple[str, str] | None:
    """(key, suffix) of a member name, or None for members that are not sample parts."""
    if _SKIPPED.search(name):
        return None
    match = _KEY_SUFFIX.match(name)
    if not match:
        return None
    return match.group(1), match.group(2)


def _text(data: bytes) -> str:
    """A text member as stored; undecodable bytes become U+FFFD (logged)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        logger.warning("a WebDataset text member is not UTF-8; undecodable bytes replaced")
        return data.decode("utf-8", errors="replace")


class _Sample:
    """The members of one sample read so far (only those that become columns)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.members: dict[str, bytes] = {}
        self.suffixes: list[str] = []
        self.problem: RowError | None = None


class _CheckedTarInfo(tarfile.TarInfo):
    """Remembers why the archive ended. `TarFile.next` treats any header it
    cannot read after the first as the end of the archive, so a truncated or
    garbled shard would end early without a word; `check_end` tells them apart."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> _CheckedTarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            tarfile_.end_reason = e  # type: ignore[attr-defined]
            raise


def check_end(tar: tarfile.TarFile) -> None:
    """Raise `tarfile.ReadError` unless the archive ended cleanly: at its
    end-of-archive zero blocks, or exactly at a member boundary."""
    reason = getattr(tar, "end_reason", None)
    # tarfile's private HeaderError subclasses, by name (typeshed omits them).
    kind = type(reason).__name__
    if reason is None or kind == "EOFHeaderError":  # the zero blocks
        return
    stream = tar.fileobj
    at_boundary = stream is not None and stream.tell() == tar.offset
    if kind == "EmptyHeaderError" and at_boundary:  # no end marker, nothing cut
        return
    what = "truncated" if not at_boundary or "truncated" in str(reason) else "corrupt"
    raise tarfile.ReadError(f"{what} tar at byte {tar.offset}: {reason}")


def iter_samples(fileobj: IO[bytes], max_member_bytes: int) -> Iterator[_Sample]:
    """Group a tar stream's members into samples, reading only the members used.

    Raises:
        tarfile.TarError, OSError, EOFError: the stream is not (or stops being) a tar.
    """
    wanted = set(IMAGE_SUFFIXES) | set(TEXT_SUFFIXES)
    current: _Sample | None = None
    with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = split_name(member.name)
            if parts is None:
                continue
            key, suffix = parts
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = _Sample(key)
            suffix = suffix.lower()
            current.suffixes.append(suffix)
            if suffix not in wanted or suffix in current.members:
                continue
            if member.size > max_member_bytes:
                current.problem = RowError(
                    ErrorCode.TOO_LARGE,
                    f"member {member.name!r} is {member.size} bytes, over the "
                    f"{max_member_bytes}-byte limit (--max-image-bytes)",
                )
                continue
            stream = tar.extractfile(member)
            if stream is not None:
                current.members[suffix] = stream.read()
        try:
            check_end(tar)
        except tarfile.ReadError:
            # The sample in hand is whole up to the damage: label it if its image is.
            if current is not None and any(s in current.members for s in IMAGE_SUFFIXES):
                yield current
            raise
    if current is not None:
        yield current


def read_shard(
    path: str, max_member_bytes: int
) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
    """The rows of one shard: (sample number, values, error or None).

    Values hold every `SCHEMA` column; the image bytes are under `IMAGE_COLUMN`.
    Reading problems become rows: nothing raises for a bad shard.
    """
    import fsspec

    url = redact_uri(path)
    position = 0

    def values(key: str | None) -> dict[str, Any]:
        return {"__key__": key, "__url__": url, **dict.fromkeys(TEXT_SUFFIXES), IMAGE_COLUMN: None}

    try:
        # No fsspec decompression: tarfile's "r|*" recognizes gzip, bz2 and xz itself.
        with fsspec.open(path, "rb") as f:
            for sample in iter_samples(f, max_member_bytes):
                row = values(sample.key)
                for suffix in TEXT_SUFFIXES:
                    if suffix in sample.members:
                        row[suffix] = _text(sample.members[suffix])
                image = next((s for s in IMAGE_SUFFIXES if s in sample.members), None)
                error = sample.problem
                if image is not None:
                    row[IMAGE_COLUMN] = sample.members[image]
                elif error is None:
                    error = RowError(
                        ErrorCode.NO_IMAGE,
                        f"sample {sample.key!r} in {url} has no image member "
                        f"({', '.join(IMAGE_SUFFIXES)}); its members: "
                        f"{', '.join(sample.suffixes)}",
                    )
                yield position, row, error
                position += 1
    except FileNotFoundError as e:
        yield position, values(None), RowError(ErrorCode.NOT_FOUND, f"{url}: {e}")
    except PermissionError as e:
        yield position, values(None), RowError(ErrorCode.PERMISSION_DENIED, f"{url}: {e}")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # A truncated or corrupt shard (or a read that failed midway): the samples
        # read so far are rows already; the rest of the shard is this one row.
        code = ErrorCode.BAD_SHARD if not isinstance(e, ConnectionError) else ErrorCode.READ_ERROR
        yield (
            position,
            values(None),
            RowError(
                code,
                f"{url}: cannot read past sample {position}: {type(e).__name__}: {e}",
                Status.DECODE_ERROR if code is ErrorCode.BAD_SHARD else None,
            ),
        )


def count_samples(path: str) -> int | None:
    """Samples in a local uncompressed shard, read from its member headers only
    (tarfile seeks past the data); None when that is not cheap."""
    count = 0
    last: str | None = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                parts = split_name(member.name) if member.isfile() else None
                if parts is not None and parts[0] != last:
                    count += 1
                    last = parts[0]
    except (tarfile.TarError, OSError, EOFError):
        return None
    return count
