"""Live progress for local runs: workers write counts, the launcher prints them.

Worker processes (in-process or `--direct_running_mode multi_processing`) each
write their running count to a small file in a temp folder; a thread in the
launcher sums the files and prints images done, images/s and an ETA.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import apache_beam as beam


class ReportProgress(beam.DoFn):
    """Counts records and writes the count to `<progress_dir>/<worker>.count`."""

    def __init__(self, progress_dir: str, interval_s: float = 0.5) -> None:
        self._dir = progress_dir
        self._interval = interval_s

    def setup(self) -> None:
        self._path = Path(self._dir) / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.count"
        self._count = 0
        self._last = 0.0

    def _flush(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        try:
            tmp.write_text(str(self._count))
            os.replace(tmp, self._path)
        except OSError:  # progress is best effort; never fail the job over it
            pass
        self._last = time.monotonic()

    def process(self, _: Any) -> None:
        self._count += 1
        if time.monotonic() - self._last >= self._interval:
            self._flush()

    def finish_bundle(self) -> None:
        self._flush()


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(done: int, total: int | None, elapsed: float) -> str:
    """E.g. ``"120/400 images (30%) · 35.2 images/s · ETA 8s"``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        eta = _format_duration((total - done) / rate) if rate > 0 and done < total else "-"
        pct = 100.0 * done / total
        return f"{done}/{total} images ({pct:.0f}%) · {rate:.1f} images/s · ETA {eta}"
    return f"{done} images · {rate:.1f} images/s"


class ProgressPrinter:
    """Prints progress from the count files until stopped."""

    def __init__(self, progress_dir: str, total: int | None, stream: TextIO | None = None) -> None:
        self._dir = Path(progress_dir)
        self._total = total
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._interval = 1.0 if self._tty else 10.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._start = time.monotonic()

    def done(self) -> int:
        total = 0
        for path in self._dir.glob("*.count"):
            try:
                total += int(path.read_text() or 0)
            except (OSError, ValueError):
                continue
        return total

    def _loop(self) -> None:
        last_done = -1
        while not self._stop.wait(self._interval):
            done = self.done()
            if done == 0 or (done == last_done and not self._tty):
                continue
            last_done = done
            line = progress_line(done, self._total, time.monotonic() - self._start)
            if self._tty:
                self._stream.write("\r\033[K" + line)
            else:
                self._stream.write(line + "\n")
            self._stream.flush()

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self._tty:
            self._stream.write("\r\033[K")
            self._stream.flush()
