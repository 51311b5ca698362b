"""The run's summary: counts by status, errors by code and top labels, combined
in the pipeline (`SummarizeRecords`) and written last, as the commit of the
run (`WriteSummary`): `__label_images__/summary.json` is the completion marker.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam

from pipelines.output import (
    LABELS_FILE,
    META_DIR,
    RUN_MARKER,
    SUMMARY_FILE,
    OutputPlan,
    _fs,
    _join,
    _listing,
    list_ours,
    write_atomic,
)
from transforms.errors import Status
from transforms.rows import RecordFormat

#: Labels listed in the summary, the most frequent first.
TOP_LABELS = 20


class SummarizeRecords(beam.CombineFn):
    """Counts rows by status, errors by code, and labels (top-1) of ok rows.

    Args:
        fmt: the record format, which names the columns (`--output-prefix`).
    """

    def __init__(self, fmt: RecordFormat | None = None) -> None:
        fmt = fmt or RecordFormat()
        self._status = fmt.name("status")
        self._label = fmt.name("label")
        self._error = fmt.name("error")

    def create_accumulator(self) -> dict[str, Counter]:
        return {"status": Counter(), "errors": Counter(), "labels": Counter()}

    def add_input(self, acc: dict[str, Counter], record: Mapping[str, Any]) -> dict[str, Counter]:
        status = record[self._status]
        acc["status"][status] += 1
        if status == Status.OK.value:
            if record.get(self._label) is not None:
                acc["labels"][record[self._label]] += 1
        else:
            acc["errors"][str(record.get(self._error) or "").split(":", 1)[0]] += 1
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
    """Commits the run once every part file is written (they come as a side input).

    summary.json is written atomically; then this tool's files that the run
    does not own (a previous output replaced by `--overwrite`, stale temp
    files) are removed, and last the run marker.
    """

    def __init__(
        self,
        plan: OutputPlan,
        started_at: float,
        config: Mapping[str, Any],
        steady_from: float | None = None,
        labels: Sequence[str] = (),
    ) -> None:
        self._plan = plan
        self._started_at = started_at
        self._steady_from = steady_from
        self._config = dict(config)
        self._labels = list(labels)

    def process(
        self,
        _: Any,
        files: list[str],
        stats: dict[str, Any],
        rows_in: int,
        rows_skipped: int = 0,
        resumed_stats: dict[str, Any] | None = None,
    ) -> Iterator[dict[str, Any]]:
        committed = sorted({posixpath.basename(f) for f in files} | set(self._plan.resumed_files))
        new_ok = int(stats.get("by_status", {}).get(Status.OK.value, 0))
        summary = build_summary(
            stats=merge_stats(stats, resumed_stats) if resumed_stats else stats,
            new_ok=new_ok,
            rows_in=rows_in,
            rows_skipped=rows_skipped,
            rows_resumed=self._plan.resumed_rows,
            files=committed,
            started_at=self._started_at,
            finished_at=time.time(),
            steady_from=self._steady_from,
            config=self._config,
        )
        fs, path = _fs(self._plan.directory)
        labels = json.dumps({"labels": self._labels}, ensure_ascii=False).encode("utf-8")
        write_atomic(fs, _join(path, LABELS_FILE), lambda f: f.write(labels))
        text = json.dumps(summary, indent=2, sort_keys=False, default=str).encode("utf-8")
        write_atomic(fs, _join(path, SUMMARY_FILE), lambda f: f.write(text))
        # Everything else of ours goes: parts no successful bundle reported
        # (orphans of failed attempts), an output --overwrite replaces, an older
        # report (the launcher writes this run's next), temp files.
        keep = {*committed, META_DIR, RUN_MARKER}
        for name in list_ours(self._plan.directory):
            if name not in keep:
                fs.rm(_join(path, name), recursive=True)
        written = {posixpath.basename(SUMMARY_FILE), posixpath.basename(LABELS_FILE)}
        for name in _listing(fs, _join(path, META_DIR)):
            if name not in written:
                fs.rm(_join(path, f"{META_DIR}/{name}"), recursive=True)
        if fs.exists(_join(path, RUN_MARKER)):
            fs.rm(_join(path, RUN_MARKER))
        yield summary


def merge_stats(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two `SummarizeRecords` outputs as one (this run's rows and resumed ones)."""
    status = Counter(a.get("by_status", {})) + Counter(b.get("by_status", {}))
    errors = Counter(a.get("errors_by_code", {})) + Counter(b.get("errors_by_code", {}))
    labels: Counter[str] = Counter()
    for stats in (a, b):
        for item in stats.get("top_labels", []):
            labels[item["label"]] += item["count"]
    return {
        "by_status": dict(status),
        "errors_by_code": dict(errors.most_common()),
        "top_labels": [{"label": k, "count": v} for k, v in labels.most_common(TOP_LABELS)],
    }


def build_summary(
    *,
    stats: Mapping[str, Any],
    rows_in: int,
    files: Iterable[str],
    rows_skipped: int = 0,
    rows_resumed: int = 0,
    new_ok: int | None = None,
    started_at: float,
    finished_at: float,
    steady_from: float | None = None,
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """The summary.json of a run.

    `images_per_s` counts from `started_at` (the process start: start-up,
    model load and Parquet writes included); `steady_images_per_s` counts from
    `steady_from`, when the pipeline itself started.
    """
    from transforms import __version__

    by_status = {s.value: int(stats.get("by_status", {}).get(s.value, 0)) for s in Status}
    rows_out = sum(by_status.values())
    wall = max(finished_at - started_at, 1e-9)
    steady = max(finished_at - (steady_from or started_at), 1e-9)
    new_ok = by_status["ok"] if new_ok is None else new_ok
    return {
        "version": __version__,
        "rows_in": int(rows_in),
        "rows_skipped": int(rows_skipped),
        "rows_resumed": int(rows_resumed),
        "rows_out": rows_out,
        "rows_by_status": by_status,
        "error_rate": (rows_out - by_status["ok"]) / rows_out if rows_out else 0.0,
        "errors_by_code": dict(stats.get("errors_by_code", {})),
        "top_labels": list(stats.get("top_labels", [])),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(new_ok / wall, 3),
        "steady_images_per_s": round(new_ok / steady, 3),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished_at)),
        "output_files": sorted(posixpath.basename(f) for f in files),
        "config": dict(config),
    }
