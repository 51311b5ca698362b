"""Reading local image files without ever blocking on something that is not one.

A read from a local disk finishes; one from a network or FUSE mount (NFS, SMB,
gcsfuse, sshfs, ...) can hang in the kernel for good. `LocalFilesystems` tells
the two apart per directory, from the mount table, so the fetcher reads files
on local disks in the calling thread and puts a deadline (a reader thread) only
on reads that may hang.
"""

from __future__ import annotations

import os
import stat
import threading

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


#: Filesystem types whose reads finish: disks, memory and images of them.
#: Anything else (nfs, cifs/smb3, fuse.* such as gcsfuse or sshfs, 9p, ceph,
#: lustre, glusterfs ...) may block in the kernel with no way to interrupt it.
LOCAL_FILESYSTEMS = frozenset(
    {
        "bcachefs",
        "btrfs",
        "devtmpfs",
        "erofs",
        "exfat",
        "ext2",
        "ext3",
        "ext4",
        "f2fs",
        "hfsplus",
        "iso9660",
        "jfs",
        "msdos",
        "nilfs2",
        "ntfs",
        "ntfs3",
        "overlay",
        "ramfs",
        "squashfs",
        "tmpfs",
        "udf",
        "vfat",
        "xfs",
        "zfs",
    }
)

MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes come octal-escaped."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def read_mount_table(path: str = MOUNTINFO) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount, longest mount point first;
    empty where the table cannot be read (then no directory counts as local)."""
    mounts = []
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                fstype = line.split(" - ", 1)[1].split()[0]
                mounts.append((_unescape(fields[4]), fstype))
    except OSError:
        return []
    return sorted(mounts, key=lambda m: len(m[0]), reverse=True)


def filesystem_of(path: str, mounts: list[tuple[str, str]]) -> str | None:
    """The type of the filesystem that holds `path` (symlinks resolved): that of
    the longest mount point above it."""
    real = os.path.realpath(path)
    for point, fstype in mounts:
        if real == point or real.startswith(point.rstrip("/") + "/"):
            return fstype
    return None


class LocalFilesystems:
    """Which directories lie on local filesystems, remembered per directory.

    `classify` resolves a directory's symlinks, which touches every directory
    on the way: for a hung mount it can block too, so the fetcher runs it under
    its deadline, once per directory. A file that is itself a symlink may point
    anywhere, so `reads_directly` is False for it.
    """

    #: Directories remembered at most (a manifest spread over more starts over).
    MAX_DIRECTORIES = 65536

    def __init__(self, mount_table: str = MOUNTINFO) -> None:
        self._mount_table = mount_table
        self._mounts: list[tuple[str, str]] | None = None
        self._local: dict[str, bool] = {}
        self._lock = threading.Lock()

    def known(self, directory: str) -> bool | None:
        """Whether `directory` is on a local filesystem; None until classified."""
        return self._local.get(directory)

    def classify(self, directory: str) -> bool:
        """Find out (and remember) whether `directory` is on a local filesystem."""
        with self._lock:
            if self._mounts is None:
                self._mounts = read_mount_table(self._mount_table)
            mounts = self._mounts
        local = filesystem_of(directory, mounts) in LOCAL_FILESYSTEMS
        if len(self._local) >= self.MAX_DIRECTORIES:
            self._local.clear()
        self._local[directory] = local
        return local

    @staticmethod
    def reads_directly(path: str) -> bool:
        """Whether a file in a local directory can be read in the calling thread:
        not a symlink (a missing file is, and fails there at once)."""
        try:
            return not stat.S_ISLNK(os.lstat(path).st_mode)
        except OSError:
            return True
