"""`label-images export label-studio`: tasks and a labeling config that Label Studio's own
SDK (label-studio-sdk) accepts, for single labels, multi-label tags, URLs and local files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

import pytest

from pipelines import export
from pipelines.label_images import EXIT_OK
from tests.conftest import read_output, run_job
from tests.http_server import serve

pytestmark = pytest.mark.slow


def _export(out: Path, to: Path, *extra: str) -> tuple[list[dict[str, Any]], str]:
    assert export.main(["label-studio", str(out), "--to", str(to), *extra]) == EXIT_OK
    return json.loads((to / "tasks.json").read_text()), (to / "config.xml").read_text()


def _validate(tasks: list[dict[str, Any]], config: str) -> Any:
    """Every task and prediction through label-studio-sdk's own validation."""
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface(config)
    for task in tasks:
        # validate_task would call validate_prediction() without the prediction
        # (label-studio-sdk 2.1.2), so the data and the predictions go separately.
        assert interface.validate_task(cast(Any, {"data": task["data"]})), task
        for prediction in task["predictions"]:
            assert interface.validate_prediction(prediction, return_errors=True) == []
    return interface


def test_single_label_export_of_local_files(
    photo_dir: Path, tiny_vit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "list.txt"
    photos = sorted(photo_dir.glob("*.jpg"))
    manifest.write_text("\n".join([*(p.name for p in photos), "missing.jpg"]) + "\n")
    for p in photos:  # relative manifest entries, resolved against the manifest's folder
        (tmp_path / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    assert run_job(["--input", str(manifest), "--output", str(out), "--model", str(tiny_vit)]) == 0
    tasks, config = _export(out, tmp_path / "ls", "--document-root", str(tmp_path))
    interface = _validate(tasks, config)
    control = interface.get_control("label")
    assert sorted(control.labels) == [f"class_{i}" for i in range(7)]  # every label
    assert 'choice="single"' in config
    rows = {r["source_row"]: r for r in read_output(out).to_pylist()}
    assert len(tasks) == len(photos) == sum(r["status"] == "ok" for r in rows.values())
    for task in tasks:
        row = rows[task["data"]["source_row"]]
        assert task["meta"] == {"source_file": str(manifest), "source_row": row["source_row"]}
        assert task["data"]["source_file"] == str(manifest)
        reference = task["data"]["image"]
        assert reference.startswith("/data/local-files/?d=")
        assert (tmp_path / unquote(reference.split("?d=", 1)[1])).read_bytes() == (
            tmp_path / row["uri"]
        ).read_bytes()
        (prediction,) = task["predictions"]
        assert prediction["result"][0]["value"] == {"choices": [row["label"]]}
        assert prediction["score"] == pytest.approx(row["score"])
        assert prediction["model_version"] == str(tiny_vit)
    assert "not ok 1" in capsys.readouterr().err
    # A local image outside the document root is a clear error, not a broken task.
    elsewhere = ["--document-root", str(photo_dir)]
    assert export.main(["label-studio", str(out), "--to", str(tmp_path / "x"), *elsewhere]) == 2
    assert "--document-root" in capsys.readouterr().err


def test_multi_label_tags_of_urls(photo_dir: Path, tiny_multilabel: Path, tmp_path: Path) -> None:
    images = {p.name: p.read_bytes() for p in sorted(photo_dir.glob("*.jpg"))}
    with serve(images) as server:
        host, port = server.server_address[:2]
        urls = [f"http://{host!s}:{port}/img/{name}" for name in images]
        manifest = tmp_path / "urls.txt"
        manifest.write_text("\n".join(urls) + "\n")
        out = tmp_path / "out"
        args = ["--input", str(manifest), "--output", str(out), "--model", str(tiny_multilabel)]
        assert run_job([*args, "--threshold", "0.5", "--top-k", "0"]) == EXIT_OK
    tasks, config = _export(out, tmp_path / "ls")
    _validate(tasks, config)
    assert 'choice="multiple"' in config
    rows = {r["source_row"]: r for r in read_output(out).to_pylist()}
    assert len(tasks) == len(urls)
    kept = 0
    for task in tasks:
        row = rows[task["meta"]["source_row"]]
        assert task["data"]["image"] == row["uri"]  # URLs go as they are
        choices = task["predictions"][0]["result"][0]["value"]["choices"]
        assert choices == row["labels"]
        kept += len(choices)
    assert kept > len(tasks)  # tags: several labels per image on average


def test_zero_shot_config_lists_the_candidate_labels(
    photo_dir: Path, tiny_clip: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(str(p) for p in sorted(photo_dir.glob("*.jpg"))) + "\n")
    out = tmp_path / "out"
    labels = ["a cat", 'a "quoted" <dog>', "coffee & cream"]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    args = ["--input", str(manifest), "--output", str(out), "--model", str(tiny_clip)]
    assert run_job([*args, "--candidate-labels-file", str(tmp_path / "labels.txt")]) == 0
    tasks, config = _export(out, tmp_path / "ls")
    interface = _validate(tasks, config)
    assert interface.get_control("label").labels == labels
