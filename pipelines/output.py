"""The output directory: refusing or clearing old output, and summary.json."""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import apache_beam as beam
import fsspec

from transforms.errors import Status

logger = logging.getLogger(__name__)

SHARD_PREFIX = "part"
SHARD_SUFFIX = ".parquet"
SUMMARY_FILE = "summary.json"
TOP_LABELS = 20


class OutputError(RuntimeError):
    """The output directory cannot be used as asked."""


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def _fs(directory: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(directory)
    return fs, path


def _ours(name: str) -> bool:
    """Files and folders this tool writes into an output directory."""
    return (
        (name.startswith(SHARD_PREFIX + "-") and name.endswith(SHARD_SUFFIX))
        or name == SUMMARY_FILE
        or name.startswith("beam-temp-")
    )


def prepare_output(directory: str, *, overwrite: bool) -> None:
    """Refuse a non-empty output directory, or clear our old output from it.

    With `overwrite`, the old shards, summary and Beam temp folders are removed
    first, so a re-run leaves exactly one set of files. Other files are kept.

    Raises:
        OutputError: the directory is not empty and `overwrite` is False.
    """
    fs, path = _fs(directory)
    if not fs.exists(path):
        fs.makedirs(path, exist_ok=True)
        return
    if not fs.isdir(path):
        raise OutputError(f"--output {directory} is a file, not a directory")
    entries = [e for e in fs.ls(path, detail=False) if posixpath.basename(e.rstrip("/"))]
    entries = [e for e in entries if e.rstrip("/") != path.rstrip("/")]
    if not entries:
        return
    if not overwrite:
        names = sorted(posixpath.basename(e.rstrip("/")) for e in entries)
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        raise OutputError(
            f"--output {directory} is not empty ({len(names)} entries: {shown}); "
            "pass --overwrite to replace the previous output, or choose another directory"
        )
    removed = 0
    for entry in entries:
        if _ours(posixpath.basename(entry.rstrip("/"))):
            fs.rm(entry, recursive=True)
            removed += 1
    logger.info("--overwrite: removed %d old output entries from %s", removed, directory)


def shard_prefix(directory: str) -> str:
    return _join(directory, SHARD_PREFIX)


class SummarizeRecords(beam.CombineFn):
    """Counts rows by status, errors by code, and labels (top-1) of ok rows."""

    def create_accumulator(self) -> dict[str, Counter]:
        return {"status": Counter(), "errors": Counter(), "labels": Counter()}

    def add_input(self, acc: dict[str, Counter], record: Mapping[str, Any]) -> dict[str, Counter]:
        acc["status"][record["status"]] += 1
        if record["status"] == Status.OK.value:
            if record.get("label") is not None:
                acc["labels"][record["label"]] += 1
        else:
            acc["errors"][str(record.get("error") or "").split(":", 1)[0]] += 1
        return acc

    def merge_accumulators(self, accs: Iterable[dict[str, Counter]]) -> dict[str, Counter]:
        merged = self.create_accumulator()
        for acc in accs:
            for key in merged:
                merged[key].update(acc[key])
        return merged

    def extract_output(self, acc: dict[str, Counter]) -> dict[str, Any]:
        return {
            "by_status": dict(acc["status"]),
            "errors_by_code": dict(acc["errors"].most_common()),
            "top_labels": [
                {"label": label, "count": count}
                for label, count in acc["labels"].most_common(TOP_LABELS)
            ],
        }


class WriteSummary(beam.DoFn):
    """Writes summary.json once the shards are final (they come as a side input)."""

    def __init__(self, directory: str, started_at: float, config: Mapping[str, Any]) -> None:
        self._directory = directory
        self._started_at = started_at
        self._config = dict(config)

    def process(
        self, _: Any, files: list[str], stats: dict[str, Any], rows_in: int, rows_skipped: int = 0
    ) -> Iterator[dict[str, Any]]:
        summary = build_summary(
            stats=stats,
            rows_in=rows_in,
            rows_skipped=rows_skipped,
            files=files,
            started_at=self._started_at,
            finished_at=time.time(),
            config=self._config,
        )
        fs, path = _fs(self._directory)
        with fs.open(_join(path, SUMMARY_FILE), "w") as f:
            f.write(json.dumps(summary, indent=2, sort_keys=False, default=str))
        yield summary


def build_summary(
    *,
    stats: Mapping[str, Any],
    rows_in: int,
    files: Iterable[str],
    rows_skipped: int = 0,
    started_at: float,
    finished_at: float,
    config: Mapping[str, Any],
) -> dict[str, Any]:
    from transforms import __version__

    by_status = {s.value: int(stats.get("by_status", {}).get(s.value, 0)) for s in Status}
    rows_out = sum(by_status.values())
    wall = max(finished_at - started_at, 1e-9)
    return {
        "version": __version__,
        "rows_in": int(rows_in),
        "rows_skipped": int(rows_skipped),
        "rows_out": rows_out,
        "rows_by_status": by_status,
        "error_rate": (rows_out - by_status["ok"]) / rows_out if rows_out else 0.0,
        "errors_by_code": dict(stats.get("errors_by_code", {})),
        "top_labels": list(stats.get("top_labels", [])),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(by_status["ok"] / wall, 3),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished_at)),
        "output_files": sorted(posixpath.basename(f) for f in files),
        "config": dict(config),
    }


def read_summary(directory: str) -> dict[str, Any]:
    fs, path = _fs(directory)
    with fs.open(_join(path, SUMMARY_FILE), "r") as f:
        data: dict[str, Any] = json.load(f)
    return data
