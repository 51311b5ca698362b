"""Reading local image files without ever blocking on something that is not one."""

from __future__ import annotations

import os
import stat

from transforms.errors import ErrorCode, RowError

_LOCAL_KINDS = (
    (stat.S_ISDIR, ErrorCode.IS_DIRECTORY, "is a directory"),
    (stat.S_ISFIFO, ErrorCode.IS_FIFO, "is a FIFO (named pipe)"),
    (stat.S_ISCHR, ErrorCode.IS_DEVICE, "is a character device"),
    (stat.S_ISBLK, ErrorCode.IS_DEVICE, "is a block device"),
    (stat.S_ISSOCK, ErrorCode.IS_SOCKET, "is a socket"),
)


def _check_regular(path: str, mode: int, size: int, limit: int) -> None:
    for test, code, what in _LOCAL_KINDS:
        if test(mode):
            raise RowError(code, f"{path} {what}, not a regular file")
    if not stat.S_ISREG(mode):
        raise RowError(ErrorCode.NOT_A_FILE, f"{path} is not a regular file")
    if size > limit:
        raise RowError(ErrorCode.TOO_LARGE, f"{path} is {size} bytes, over the {limit} byte limit")


def read_local_file(path: str, limit: int) -> bytes:
    """Read a local image file, never opening anything but a regular file.

    `stat` first: a FIFO would block `open` forever, `/dev/zero` would never
    end, a directory or socket cannot be read. The file is then opened
    non-blocking and checked again, in case it changed in between, and at
    most `limit + 1` bytes are read.

    Raises:
        RowError: a specific code per kind of path; OSError for other failures
            (classified by `classify_fetch_error`).
    """
    _check_regular(path, *_stat(path), limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        _check_regular(path, info.st_mode, info.st_size, limit)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def _stat(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_mode, info.st_size
