"""`label-images export label-studio OUTPUT_DIR --to DIR`: review the labels in Label Studio.

An output of several models (`models:`) is exported one model at a time
(`--model NAME`): that model's labels and the rows it labeled.

Writes two files:

- `DIR/tasks.json`: Label Studio's JSON import, one task per `ok` row, with the
  image reference, the row's `source_file`/`source_row` in `data` and `meta`,
  and a prediction (`model_version`, `score`, a `choices` result: the top-1
  label, or with `--threshold` every kept tag);
- `DIR/config.xml`: the matching labeling config, with every label the model
  can give (single choice, or multiple choice for `--threshold` tags).

Images are referenced the way Label Studio reads them: http(s) URLs, `gs://` and
`s3://` as they are (Label Studio's cloud storage serves those), local files as
`/data/local-files/?d=<path below --document-root>` (Label Studio's local-files
storage with `LOCAL_FILES_SERVING_ENABLED=true` and
`LOCAL_FILES_DOCUMENT_ROOT` set to the same root).
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import fsspec
import pyarrow.parquet as pq

from pipelines.output import LABELS_FILE, _join, read_summary
from transforms.errors import Status
from transforms.resolve import model_key
from transforms.rows import RecordFormat
from transforms.uri import is_remote, strip_file_scheme

#: The names tasks and the config share.
IMAGE_KEY = "image"
FROM_NAME = "label"
#: Label Studio's URL prefix for files of its local-files storage.
LOCAL_FILES_PREFIX = "/data/local-files/?d="
#: Columns that can say where a row's image is, after the job's URI column.
FALLBACK_IMAGE_COLUMNS = ("url",)


class ExportError(ValueError):
    """The output cannot be exported as asked; the message says what to change."""


@dataclass(frozen=True)
class _Output:
    """What the export needs to know of a finished output."""

    directory: str
    files: list[str]
    fmt: RecordFormat
    uri_column: str | None
    image_path_column: str | None
    model_version: str
    multi_label: bool
    labels: list[str]
    model: str | None = None  # the model of a several-model output whose labels go


def _describe(directory: str, model: str | None = None) -> _Output:
    try:
        summary = read_summary(directory)
    except FileNotFoundError:
        raise ExportError(f"{directory} has no summary.json (no finished run)") from None
    files = [_join(directory, name) for name in summary.get("output_files", [])]
    if not files:
        raise ExportError(f"{directory} holds no part files")
    with fsspec.open(files[0], "rb") as f:
        schema = pq.read_schema(f)
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    image_column = meta.get("image_labeler.image_column") or ""
    path_column = f"{image_column}_path" if image_column else None
    fmt = RecordFormat.of_schema(schema)
    names = [m.name for m in fmt.models]
    if names and model is None:
        raise ExportError(f"{directory} holds several models {names}; pass --model NAME")
    if model is not None and model not in names:
        held = f"the models {names}" if names else "one unnamed model"
        raise ExportError(f"--model {model}: {directory} holds {held}")
    try:
        with fsspec.open(_join(directory, LABELS_FILE), "r") as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise ExportError(
            f"{directory} has no {LABELS_FILE} (written by label-images 0.2 and later); "
            "label it again to export it"
        ) from None
    labels = list(saved["models"][model] if model is not None else saved["labels"])
    name = meta.get(model_key("image_labeler.model", model), "")
    revision = meta.get(model_key("image_labeler.revision", model), "")
    return _Output(
        directory=directory,
        files=files,
        fmt=fmt,
        uri_column=meta.get("image_labeler.uri_column") or None,
        image_path_column=path_column if path_column in schema.names else None,
        model_version=f"{name}@{revision}" if revision else name,
        multi_label=model_key("image_labeler.threshold", model) in meta,
        labels=labels,
        model=model,
    )


def labeling_config(labels: Sequence[str], multi_label: bool) -> str:
    """Label Studio's labeling config: the image and one `Choices` of every label."""
    choice = "multiple" if multi_label else "single"
    lines = [
        "<View>",
        f'  <Image name="{IMAGE_KEY}" value="${IMAGE_KEY}"/>',
        f'  <Choices name="{FROM_NAME}" toName="{IMAGE_KEY}" choice="{choice}" showInline="true">',
        *(f"    <Choice value={quoteattr(label)}/>" for label in labels),
        "  </Choices>",
        "</View>",
    ]
    return "\n".join(lines) + "\n"


def image_reference(uri: str, document_root: str) -> str:
    """How Label Studio reads an image: URLs and cloud URIs as they are, local files
    through its local-files storage, relative to `document_root`.

    Raises:
        ExportError: a local file outside `document_root`.
    """
    if is_remote(uri):
        return uri
    path = os.path.abspath(strip_file_scheme(uri))
    root = os.path.abspath(document_root)
    if os.path.commonpath([path, root]) != root:
        raise ExportError(
            f"{path} is not under --document-root {root}; pass the folder Label Studio "
            "serves local files from (its LOCAL_FILES_DOCUMENT_ROOT)"
        )
    return LOCAL_FILES_PREFIX + quote(os.path.relpath(path, root))


def _image_uri(row: dict[str, Any], output: _Output) -> str | None:
    from transforms.uri import resolve_uri

    source = row.get(output.fmt.name("source_file")) or ""
    for column in (output.uri_column, output.image_path_column, *FALLBACK_IMAGE_COLUMNS):
        value = row.get(column) if column else None
        if value:
            return resolve_uri(str(value), posixpath.dirname(source))
    return None


def tasks(output: _Output, document_root: str, skipped: Counter[str]) -> Iterator[dict[str, Any]]:
    """One Label Studio task per ok row; rows left out are counted in `skipped`."""
    fmt, model = output.fmt, output.model
    columns = {fmt.name(c, model) for c in ("label", "score", "labels", "status")}
    columns |= {fmt.name("source_file"), fmt.name("source_row")}
    columns |= {c for c in (output.uri_column, output.image_path_column) if c}
    columns |= set(FALLBACK_IMAGE_COLUMNS)
    for path in output.files:
        with fsspec.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            present = [c for c in parquet.schema_arrow.names if c in columns]
            for batch in parquet.iter_batches(batch_size=4096, columns=present):
                for row in batch.to_pylist():
                    if row.get(fmt.name("status", model)) != Status.OK.value:
                        skipped["not ok"] += 1
                        continue
                    uri = _image_uri(row, output)
                    if uri is None:
                        skipped["no image reference (image inside the input)"] += 1
                        continue
                    source = {
                        "source_file": row.get(fmt.name("source_file")),
                        "source_row": row.get(fmt.name("source_row")),
                    }
                    choices = (
                        list(row.get(fmt.name("labels", model)) or [])
                        if output.multi_label
                        else [row[fmt.name("label", model)]]
                    )
                    yield {
                        "data": {IMAGE_KEY: image_reference(uri, document_root), **source},
                        "meta": source,
                        "predictions": [
                            {
                                "model_version": output.model_version,
                                "score": row.get(fmt.name("score", model)),
                                "result": [
                                    {
                                        "from_name": FROM_NAME,
                                        "to_name": IMAGE_KEY,
                                        "type": "choices",
                                        "value": {"choices": choices},
                                    }
                                ],
                            }
                        ],
                    }


def export_label_studio(
    directory: str, to: str, document_root: str = "/", model: str | None = None
) -> dict[str, Any]:
    """Write `tasks.json` and `config.xml` for Label Studio into `to`; returns counts.

    `model`: which model's labels, for an output of several (`models:`); rows
    that model labeled are exported, whatever the others gave.

    Raises:
        ExportError: the output cannot be exported (no finished run, a local
            image outside `document_root`).
    """
    output = _describe(directory, model)
    skipped: Counter[str] = Counter()
    folder = Path(to)
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = folder / ".tasks.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:  # streamed: an output of millions of rows
        f.write("[")
        for n, task in enumerate(tasks(output, document_root, skipped)):
            f.write(",\n" if n else "\n")
            f.write(json.dumps(task, ensure_ascii=False))
            count += 1
        f.write("\n]\n")
    os.replace(tmp, folder / "tasks.json")
    (folder / "config.xml").write_text(labeling_config(output.labels, output.multi_label))
    return {"tasks": count, "skipped": dict(skipped), "labels": len(output.labels)}


def main(argv: Sequence[str]) -> int:
    """`label-images export label-studio OUTPUT_DIR --to DIR [--document-root ROOT]`."""
    parser = argparse.ArgumentParser(
        prog="label-images export",
        description="Export an output for review in a labeling tool.",
    )
    parser.add_argument("tool", choices=["label-studio"])
    parser.add_argument("output", metavar="OUTPUT_DIR", help="a finished output (local or gs://)")
    parser.add_argument(
        "--to", required=True, metavar="DIR", help="where tasks.json and config.xml go"
    )
    parser.add_argument(
        "--document-root",
        default="/",
        metavar="ROOT",
        help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT: local images are referenced "
        "relative to it (default: /)",
    )
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="for an output of several models (models:), the one whose labels to review",
    )
    args = parser.parse_args(list(argv))
    try:
        counts = export_label_studio(args.output, args.to, args.document_root, args.model)
    except ExportError as e:
        print(f"label-images: error: {e}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{why} {n}" for why, n in counts["skipped"].items())
    print(
        f"Exported {counts['tasks']} tasks with {counts['labels']} labels to {args.to}/"
        f"{' (left out: ' + skipped + ')' if skipped else ''}",
        file=sys.stderr,
    )
    return 0
