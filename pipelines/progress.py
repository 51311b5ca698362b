"""Live progress for local runs: workers write counts, the launcher prints them.

Worker processes (in-process or `--direct_running_mode multi_processing`) each
write their running count to a small file in a temp folder; a thread in the
launcher sums the files and prints images done, images/s and an ETA.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import apache_beam as beam

from transforms.rows import RecordFormat


class ReportProgress(beam.DoFn):
    """Counts records (and failures by error code) into `<progress_dir>/<worker>.count`.

    Args:
        progress_dir: the launcher's folder of count files.
        fmt: the record format, which names the status and error columns.
        kind: "done" for labeled records, "skipped" for rows --skip-existing skips.
    """

    def __init__(
        self,
        progress_dir: str,
        fmt: RecordFormat | None = None,
        kind: str = "done",
        interval_s: float = 0.25,
    ) -> None:
        fmt = fmt or RecordFormat()
        self._dir = progress_dir
        self._status = fmt.name("status")
        self._error = fmt.name("error")
        self._kind = kind
        self._interval = interval_s

    def setup(self) -> None:
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}.count"
        self._path = Path(self._dir) / name
        self._counts: dict[str, Any] = {"done": 0, "skipped": 0, "failed": {}}
        self._last = 0.0

    def _flush(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self._counts))
            os.replace(tmp, self._path)
        except OSError:  # progress is best effort; never fail the job over it
            pass
        self._last = time.monotonic()

    def process(self, record: Any) -> None:
        self._counts[self._kind] += 1
        if self._kind == "done" and isinstance(record, dict) and record.get(self._status) != "ok":
            code = str(record.get(self._error) or "unknown").split(":", 1)[0]
            self._counts["failed"][code] = self._counts["failed"].get(code, 0) + 1
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


@dataclass
class Counts:
    done: int = 0
    skipped: int = 0
    failed: dict[str, int] = field(default_factory=dict)


def progress_line(done: int | Counts, total: int | None, elapsed: float, skipped: int = 0) -> str:
    """E.g. ``"120/400 images (30%) · 35.2 images/s · ETA 8s · failed: not_found 3"``.

    Args:
        total: the rows this run labels, known before it starts (rows that
            `--skip-existing` skips and `--resume` reuses are not in it).
    """
    counts = done if isinstance(done, Counts) else Counts(done=done, skipped=skipped)
    n = counts.done
    rate = n / elapsed if elapsed > 0 else 0.0
    remaining = None if total is None else max(total, 0)
    if remaining:
        eta = _format_duration((remaining - n) / rate) if rate > 0 and n < remaining else "-"
        pct = 100.0 * n / remaining
        line = f"{n}/{remaining} images ({pct:.0f}%) · {rate:.1f} images/s · ETA {eta}"
    else:
        line = f"{n} images · {rate:.1f} images/s"
    if counts.skipped:
        line += f" · skipped {counts.skipped}"
    if counts.failed:
        failed = ", ".join(
            f"{code} {k}" for code, k in sorted(counts.failed.items(), key=lambda kv: -kv[1])[:4]
        )
        line += f" · failed: {failed}"
    return line


class ProgressPrinter:
    """Prints progress from the count files until stopped.

    On a terminal the line is redrawn every 0.5 s; elsewhere (Airflow and CI
    logs) a plain line is written every 30 s.
    """

    def __init__(
        self,
        progress_dir: str,
        total: int | None,
        stream: TextIO | None = None,
        interval_s: float | None = None,
    ) -> None:
        self._dir = Path(progress_dir)
        self._total = total
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._interval = interval_s or (0.5 if self._tty else 30.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._start = time.monotonic()

    def counts(self) -> Counts:
        total = Counts()
        for path in self._dir.glob("*.count"):
            try:
                data = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                continue
            total.done += int(data.get("done", 0))
            total.skipped += int(data.get("skipped", 0))
            for code, k in data.get("failed", {}).items():
                total.failed[code] = total.failed.get(code, 0) + int(k)
        return total

    def done(self) -> int:
        return self.counts().done

    def line(self) -> str:
        return progress_line(self.counts(), self._total, time.monotonic() - self._start)

    def _loop(self) -> None:
        last = ""
        while not self._stop.wait(self._interval):
            counts = self.counts()
            if counts.done == 0 and counts.skipped == 0:
                continue
            line = progress_line(counts, self._total, time.monotonic() - self._start)
            if self._tty:
                self._stream.write("\r\033[K" + line)
            elif line != last:
                self._stream.write(line + "\n")
            last = line
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
