"""`report.html`: one self-contained page to look at a run's result.

Built from an output directory (its summary.json and part files), streamed
batch by batch so a run of millions of rows costs little memory: run metadata,
the label distribution, a histogram of top-1 scores, for each frequent label
its highest- and lowest-scoring images, the least confident rows, and failures
grouped by error code with sample URIs (redacted). Everything is inline (CSS,
SVG charts, thumbnails as small JPEG data URIs): the page makes no request to
any other site, and stays far under 20 MB whatever the run's size.

    label-images report OUTPUT_DIR     # rebuild it for an existing output
"""

from __future__ import annotations

import base64
import heapq
import html
import io
import logging
import posixpath
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.parquet as pq

from pipelines.output import REPORT_FILE, SUMMARY_FILE, _fs, _join, read_summary, write_atomic
from pipelines.summary import TOP_LABELS
from transforms.errors import redact_uri
from transforms.images.fetch import FetchOptions
from transforms.rows import RecordFormat
from transforms.spec import FETCH_FIELDS, LabelingSpec
from transforms.uri import has_scheme

logger = logging.getLogger(__name__)

GRID_LABELS = 8
PER_SIDE = 4
LOW_CONFIDENCE = 12
FAILURE_SAMPLES = 5
BINS = 20
THUMB_SIDE = 128


@dataclass
class _Row:
    score: float
    label: str
    uri: str | None
    source_file: str | None
    source_row: int | None


@dataclass
class _Stats:
    labels: Counter[str] = field(default_factory=Counter)
    bins: list[int] = field(default_factory=lambda: [0] * BINS)
    best: dict[str, list[tuple[float, int, _Row]]] = field(default_factory=dict)
    worst: dict[str, list[tuple[float, int, _Row]]] = field(default_factory=dict)
    low: list[tuple[float, int, _Row]] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)
    seen: int = 0


def _push(heap: list[tuple[float, int, _Row]], key: float, n: int, row: _Row, size: int) -> None:
    if len(heap) < size:
        heapq.heappush(heap, (key, n, row))
    elif key > heap[0][0]:
        heapq.heapreplace(heap, (key, n, row))


def _scan(
    directory: str, files: list[str], fmt: RecordFormat, uri_column: str | None
) -> dict[str | None, _Stats]:
    """Each model's statistics (one unnamed model, or each of several by name)."""
    stats = {model: _Stats() for model in fmt.model_names}
    cols = {
        model: {
            **{c: fmt.name(c, model) for c in ("label", "score", "status", "error")},
            **{c: fmt.name(c) for c in ("source_file", "source_row")},
        }
        for model in fmt.model_names
    }
    fs, root = _fs(directory)
    for name in files:
        with fs.open(_join(root, name), "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            columns = {c for col in cols.values() for c in col.values()} | {uri_column}
            wanted = [c for c in columns if c and c in names]
            for batch in parquet.iter_batches(batch_size=8192, columns=wanted):
                for record in batch.to_pylist():
                    for model, col in cols.items():
                        _add(stats[model], record, col, uri_column)
    return stats


def _add(
    stats: _Stats, record: dict[str, Any], col: dict[str, str], uri_column: str | None
) -> None:
    stats.seen += 1
    uri = record.get(uri_column) if uri_column else None
    if record.get(col["status"]) != "ok":
        code = str(record.get(col["error"]) or "unknown").split(":", 1)[0]
        stats.failures[code] += 1
        samples = stats.samples.setdefault(code, [])
        if len(samples) < FAILURE_SAMPLES:
            samples.append(redact_uri(str(uri)) if uri else f"row {record.get(col['source_row'])}")
        return
    label, score = record.get(col["label"]), record.get(col["score"])
    if label is None or score is None:
        return
    stats.labels[label] += 1
    clipped = min(max(float(score), 0.0), 1.0)
    stats.bins[min(int(clipped * BINS), BINS - 1)] += 1
    row = _Row(
        float(score), label, uri, record.get(col["source_file"]), record.get(col["source_row"])
    )
    n = stats.seen
    _push(stats.best.setdefault(label, []), row.score, n, row, PER_SIDE)
    _push(stats.worst.setdefault(label, []), -row.score, n, row, PER_SIDE)
    _push(stats.low, -row.score, n, row, LOW_CONFIDENCE)


def _embedded_image(path: str, index: int, column: str) -> bytes | None:
    """Row `index`'s image from an input Parquet file, reading only its row group."""
    with fsspec.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        start = 0
        for group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if index < start + rows:
                cell = parquet.read_row_group(group, columns=[column]).column(column)
                value = cell[index - start].as_py()
                return value.get("bytes") if isinstance(value, dict) else value
            start += rows
    return None


def fetch_options(config: dict[str, Any]) -> FetchOptions:
    """The fetch options a run used (scheme allow-list, address guard, deadline,
    retries, size limit), rebuilt from its summary's config: the report's
    thumbnail fetches are governed by them too."""
    # Only the fetch settings: the rest (the model) would be checked for nothing.
    return LabelingSpec(**{k: config[k] for k in FETCH_FIELDS if k in config}).fetch


def _thumbnail(row: _Row, image_column: str | None, fetch: FetchOptions) -> str | None:
    """A small JPEG data URI of the row's image, or None when it cannot be had."""
    from PIL import Image

    from transforms.images.decode import decode_image
    from transforms.images.fetch import fetch_bytes
    from transforms.uri import resolve_uri

    try:
        data: bytes | None = None
        if image_column and row.source_file and row.source_row is not None:
            data = _embedded_image(row.source_file, row.source_row, image_column)
        if data is None and row.uri:
            base = posixpath.dirname(row.source_file or "")
            data = fetch_bytes(resolve_uri(row.uri, base), fetch)
        if not data:
            return None
        image = decode_image(data, draft_side=THUMB_SIDE)
        image.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=70)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:  # a report never fails over one image
        logger.debug("no thumbnail for %s", redact_uri(str(row.uri)), exc_info=True)
        return None


def _bar_chart(items: list[tuple[str, int]]) -> str:
    if not items:
        return "<p class=muted>No labeled rows.</p>"
    top = max(count for _, count in items)
    height = 22 * len(items) + 10
    bars = []
    for i, (label, count) in enumerate(items):
        width = 420 * count / top
        y = 22 * i + 5
        bars.append(
            f'<text x="0" y="{y + 14}" class="axis">{html.escape(label[:40])}</text>'
            f'<rect x="260" y="{y}" width="{width:.1f}" height="16" class="bar"/>'
            f'<text x="{264 + width:.1f}" y="{y + 13}" class="axis">{count}</text>'
        )
    return (
        f'<svg role="img" aria-label="label distribution" width="760" height="{height}">'
        + "".join(bars)
        + "</svg>"
    )


def _histogram(bins: list[int]) -> str:
    top = max(bins) or 1
    width = 600 / len(bins)
    bars = []
    for i, count in enumerate(bins):
        h = 160 * count / top
        bars.append(
            f'<rect x="{i * width + 30:.1f}" y="{180 - h:.1f}" width="{width - 2:.1f}" '
            f'height="{h:.1f}" class="bar"><title>{i / len(bins):.2f}-{(i + 1) / len(bins):.2f}:'
            f" {count}</title></rect>"
        )
    ticks = "".join(
        f'<text x="{30 + 600 * t:.0f}" y="198" class="axis">{t:g}</text>'
        for t in (0.0, 0.25, 0.5, 0.75, 1.0)
    )
    return (
        '<svg role="img" aria-label="top-1 score histogram" width="660" height="205">'
        + "".join(bars)
        + ticks
        + "</svg>"
    )


def _figure(row: _Row, image_column: str | None, fetch: FetchOptions) -> str:
    src = _thumbnail(row, image_column, fetch)
    image = (
        f'<img src="{src}" alt="{html.escape(row.label)}">'
        if src
        else '<div class="noimg">no image</div>'
    )
    where = html.escape(redact_uri(row.uri) if row.uri else f"row {row.source_row}")
    return (
        f'<figure>{image}<figcaption>{row.score:.3f}<br><span class="muted">{where}'
        "</span></figcaption></figure>"
    )


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #eee}
.bar{fill:#3b7dd8}.axis{font-size:11px;fill:#444}.muted{color:#777;font-size:12px}
.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:140px}
figure img,.noimg{width:128px;height:128px;object-fit:cover;border-radius:4px;background:#eee}
.noimg{display:flex;align-items:center;justify-content:center;color:#999}
figcaption{font-size:12px;word-break:break-all}.pair{display:flex;gap:24px}
"""


def render(
    summary: dict[str, Any],
    stats: _Stats | Mapping[str | None, _Stats],
    image_column: str | None,
    fetch: FetchOptions | None = None,
) -> str:
    """The report page: the run, then each model's labels, scores, examples
    and failures (one section per model of a several-model pass)."""
    config = summary.get("config", {})
    fetch = fetch or fetch_options(config)
    effective = config.get("effective", {})
    per_model = stats if isinstance(stats, Mapping) else {None: stats}
    several = list(per_model) != [None]
    meta = [
        *(
            [("model", config.get("model")), ("task", effective.get("task"))]
            if not several
            else [("models", ", ".join(str(m) for m in per_model))]
        ),
        ("input", config.get("input")),
        ("rows in / out", f"{summary.get('rows_in')} / {summary.get('rows_out')}"),
        ("by status", ", ".join(f"{k} {v}" for k, v in summary["rows_by_status"].items() if v)),
        (
            "rows skipped / resumed",
            f"{summary.get('rows_skipped')} / {summary.get('rows_resumed')}",
        ),
        (
            "throughput",
            f"{summary.get('images_per_s')} images/s ({summary.get('steady_images_per_s')} steady)",
        ),
        ("wall time", f"{summary.get('wall_time_s')} s"),
        *(
            [("settings", ", ".join(f"{k} {v}" for k, v in effective.items()))]
            if not several
            else []
        ),
        ("finished", summary.get("finished_at")),
    ]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<title>label-images report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>label-images report</h1>",
        '<section id="metadata"><h2>Run</h2><table>',
        *(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta),
        "</table></section>",
    ]
    if not several:
        parts += _model_parts(per_model[None], image_column, fetch, level=2)
    else:
        models = {m.get("name"): m for m in config.get("models", [])}
        settings = effective.get("models", {})
        for name, model_stats in per_model.items():
            about = models.get(name, {})
            setting = ", ".join(f"{k} {v}" for k, v in settings.get(name, {}).items())
            parts += [
                f'<section id="model-{html.escape(str(name))}">',
                f"<h2>Model {html.escape(str(name))}: "
                f"{html.escape(str(about.get('model', 'default')))}</h2>",
                f"<p class=muted>{html.escape(setting)}</p>",
                *_model_parts(model_stats, image_column, fetch, level=3, ids=f"{name}-"),
                "</section>",
            ]
    parts.append("</body></html>")
    return "\n".join(parts)


def _model_parts(
    stats: _Stats, image_column: str | None, fetch: FetchOptions, *, level: int, ids: str = ""
) -> list[str]:
    """One model's label distribution, score histogram, examples, least
    confident rows and failures, under headings of `level`; section ids
    start with `ids` (the model's name, for several)."""
    h, sub = f"h{level}", f"h{level + 1}"
    parts = [
        f'<section id="{ids}labels"><{h}>Label distribution (top-1)</{h}>',
        _bar_chart(stats.labels.most_common(TOP_LABELS)),
        "</section>",
        f'<section id="{ids}scores"><{h}>Top-1 scores</{h}>',
        _histogram(stats.bins),
        "</section>",
        f'<section id="{ids}examples"><{h}>Frequent labels: highest and lowest scores</{h}>',
    ]
    for label, count in stats.labels.most_common(GRID_LABELS):
        best = [r for _, _, r in sorted(stats.best[label], key=lambda t: -t[0])]
        worst = [r for _, _, r in sorted(stats.worst[label], key=lambda t: -t[0])]
        parts.append(f"<{sub}>{html.escape(label)} <span class=muted>({count})</span></{sub}>")
        parts.append('<div class="pair"><div><div class=muted>highest</div><div class="grid">')
        parts += [_figure(r, image_column, fetch) for r in best]
        parts.append('</div></div><div><div class=muted>lowest</div><div class="grid">')
        parts += [_figure(r, image_column, fetch) for r in worst]
        parts.append("</div></div></div>")
    parts.append(f'</section><section id="{ids}low-confidence"><{h}>Least confident rows</{h}>')
    low = [r for _, _, r in sorted(stats.low, key=lambda t: -t[0])]
    parts.append('<div class="grid">')
    parts += [
        _figure(r, image_column, fetch).replace(
            "<figcaption>", f"<figcaption>{html.escape(r.label)}: ", 1
        )
        for r in low
    ]
    parts.append(f'</div></section><section id="{ids}failures"><{h}>Failures by error code</{h}>')
    if stats.failures:
        parts.append("<table><tr><th>code</th><th>rows</th><th>samples</th></tr>")
        for code, count in stats.failures.most_common():
            samples = "<br>".join(html.escape(s) for s in stats.samples.get(code, []))
            parts.append(f"<tr><td>{html.escape(code)}</td><td>{count}</td><td>{samples}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class=muted>No failures.</p>")
    parts.append("</section>")
    return parts


def build_report(directory: str) -> str:
    """Write `__label_images__/report.html` into an output directory; returns its path.

    Raises:
        FileNotFoundError: the directory has no summary.json (no finished run).
    """
    summary = read_summary(directory)
    config = summary.get("config", {})
    fs, root = _fs(directory)
    first = _join(root, summary["output_files"][0]) if summary.get("output_files") else None
    metadata: dict[bytes, bytes] = {}
    fmt = RecordFormat(prefix=config.get("output_prefix") or "")
    if first:
        with fs.open(first, "rb") as f:
            schema = pq.read_schema(f)
        metadata = schema.metadata or {}
        fmt = RecordFormat.of_schema(schema)
    uri_column = metadata.get(b"image_labeler.uri_column", b"").decode() or None
    image_column = metadata.get(b"image_labeler.image_column", b"").decode() or None
    stats = _scan(directory, summary.get("output_files", []), fmt, uri_column)
    page = render(summary, stats, image_column)
    path = _join(root, REPORT_FILE)
    write_atomic(fs, path, lambda f: f.write(page.encode("utf-8")))
    return _join(directory, REPORT_FILE) if has_scheme(directory) else path


__all__ = ["REPORT_FILE", "SUMMARY_FILE", "build_report", "main", "render"]


def main(argv: Sequence[str]) -> int:
    """`label-images report OUTPUT_DIR`: rebuild report.html of an existing output;
    exit 0, or 2 when the directory holds no finished run."""
    import argparse
    import sys

    from pipelines import logs

    parser = argparse.ArgumentParser(
        prog="label-images report",
        description="Rebuild report.html from an existing output directory (local or gs://).",
    )
    parser.add_argument("output", metavar="OUTPUT_DIR")
    args = parser.parse_args(list(argv))
    logs.setup()
    try:
        print(build_report(args.output))
    except FileNotFoundError:
        print(
            f"label-images: error: {args.output} has no summary.json (no finished run)",
            file=sys.stderr,
        )
        return 2
    return 0
