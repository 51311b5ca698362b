"""glibc malloc settings for the labeling processes.

glibc's malloc gives memory back to the kernel eagerly: freed blocks above the
dynamic mmap threshold are unmapped, and the heap top is trimmed past 128 KiB.
A forward pass allocates and frees the same large activation buffers batch
after batch, so with the defaults every batch pays for fresh pages (page faults
and zeroing). Raising the trim threshold (and the mmap threshold to glibc's
maximum), as `MALLOC_TRIM_THRESHOLD_`/`MALLOC_MMAP_THRESHOLD_` would, keeps
those pages mapped for reuse; `benchmarks/throughput.py --levers malloc`
measures the effect.

It is applied once per process, at start-up of the launcher and of each worker
(`FetchDecodePreprocess.setup`, handler loads), unless the environment already
sets either variable (the user's choice wins) or the platform is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

logger = logging.getLogger(__name__)

#: Bytes of free memory the heap keeps before it is trimmed (glibc default 128 KiB).
TRIM_THRESHOLD = 256 << 20
#: glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
MMAP_THRESHOLD = 32 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")

_lock = threading.Lock()
_done: bool | None = None


def tune_malloc() -> bool:
    """Apply the thresholds in this process (once); True if they are in effect."""
    global _done
    with _lock:
        if _done is not None:
            return _done
        _done = False
        if any(os.environ.get(name) for name in _ENV):
            return False  # the user's allocator settings (or jemalloc via LD_PRELOAD) win
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc
            return False
        trimmed = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        mapped = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        _done = trimmed and mapped
        logger.debug("malloc thresholds: trim %s, mmap %s", trimmed, mapped)
        return _done
