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


def _tally() -> dict[str, Counter]:
    return {"status": Counter(), "errors": Counter(), "labels": Counter()}


def _count(acc: dict[str, Counter], status: Any, label: Any, error: Any) -> None:
    acc["status"][status] += 1
    if status == Status.OK.value:
        if label is not None:
            acc["labels"][label] += 1
    else:
        acc["errors"][str(error or "").split(":", 1)[0]] += 1


def _tally_output(acc: Mapping[str, Counter]) -> dict[str, Any]:
    return {
        "by_status": dict(acc["status"]),
        "errors_by_code": dict(acc["errors"].most_common()),
        "top_labels": [
            {"label": label, "count": count}
            for label, count in acc["labels"].most_common(TOP_LABELS)
        ],
    }


class SummarizeRecords(beam.CombineFn):
    """Counts rows by status, errors by code, and labels (top-1) of ok rows;
    in a several-model pass, also each model's images by its own status,
    errors and labels (under `models`).

    Args:
        fmt: the record format, which names the columns (`--output-prefix`).
    """

    def __init__(self, fmt: RecordFormat | None = None) -> None:
        fmt = fmt or RecordFormat()
        self._status = fmt.name("status")
        self._error = fmt.name("error")
        self._label = fmt.name("label") if not fmt.models else None
        self._models = [
            (
                m.name,
                fmt.name("status", m.name),
                fmt.name("label", m.name),
                fmt.name("error", m.name),
            )
            for m in fmt.models
        ]

    def create_accumulator(self) -> dict[str, Any]:
        return {"row": _tally(), "models": {name: _tally() for name, *_ in self._models}}

    def add_input(self, acc: dict[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
        label = record.get(self._label) if self._label else None
        _count(acc["row"], record[self._status], label, record.get(self._error))
        for name, status, label_column, error in self._models:
            _count(
                acc["models"][name],
                record.get(status),
                record.get(label_column),
                record.get(error),
            )
        return acc

    def merge_accumulators(self, accs: Iterable[dict[str, Any]]) -> dict[str, Any]:
        merged = self.create_accumulator()
        for acc in accs:
            for tally, into in [(acc["row"], merged["row"])] + [
                (acc["models"][name], merged["models"][name]) for name in acc["models"]
            ]:
                for key in into:
                    into[key].update(tally[key])
        return merged

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        out = _tally_output(acc["row"])
        if self._models:
            out["models"] = {name: _tally_output(t) for name, t in acc["models"].items()}
        return out


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
        labels: Sequence[str] | Mapping[str, Sequence[str]] = (),
    ) -> None:
        self._plan = plan
        self._started_at = started_at
        self._steady_from = steady_from
        self._config = dict(config)
        # One model's labels, or each model's by name.
        self._labels: Any = (
            {k: list(v) for k, v in labels.items()} if isinstance(labels, Mapping) else list(labels)
        )

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
        key = "models" if isinstance(self._labels, dict) else "labels"
        labels = json.dumps({key: self._labels}, ensure_ascii=False).encode("utf-8")
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
    merged = _merge_tallies(a, b)
    if "models" in a or "models" in b:
        names = list(dict.fromkeys([*a.get("models", {}), *b.get("models", {})]))
        merged["models"] = {
            name: _merge_tallies(
                a.get("models", {}).get(name, {}), b.get("models", {}).get(name, {})
            )
            for name in names
        }
    return merged


def _merge_tallies(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
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

    by_status = _by_status(stats)
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
        **({"models": _model_sections(stats["models"])} if stats.get("models") else {}),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(new_ok / wall, 3),
        "steady_images_per_s": round(new_ok / steady, 3),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished_at)),
        "output_files": sorted(posixpath.basename(f) for f in files),
        "config": dict(config),
    }


def _by_status(stats: Mapping[str, Any]) -> dict[str, int]:
    return {s.value: int(stats.get("by_status", {}).get(s.value, 0)) for s in Status}


def _model_sections(models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """summary.json's section per model of a several-model pass."""
    sections = {}
    for name, stats in models.items():
        by_status = _by_status(stats)
        total = sum(by_status.values())
        sections[name] = {
            "images_by_status": by_status,
            "error_rate": (total - by_status["ok"]) / total if total else 0.0,
            "errors_by_code": dict(stats.get("errors_by_code", {})),
            "top_labels": list(stats.get("top_labels", [])),
        }
    return sections
