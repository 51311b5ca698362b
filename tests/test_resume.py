"""`--skip-existing`: a rerun labels exactly the rows a previous run missed or failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.label_images import EXIT_BAD_CONFIG, EXIT_OK
from pipelines.output import SUMMARY_FILE
from tests.conftest import read_output, run_job

pytestmark = pytest.mark.slow


_label = run_job


def _rows(out: Path) -> list[dict]:
    return list(read_output(out).to_pylist())


def test_rerun_labels_only_missing_and_failed_rows(
    tiny_vit: Path, photo_dir: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    names = ["chelsea.jpg", "coffee.png", "rocket.jpg", "astronaut.png", "camera_gray.png"]
    for name in names:
        (images / name).write_bytes((photo_dir / name).read_bytes())
    # An "interrupted" first run: it saw three of the rows, one of them failed
    # (the file was missing at the time).
    first_manifest = tmp_path / "first.txt"
    first_manifest.write_text("images/chelsea.jpg\nimages/coffee.png\nimages/late.jpg\n")
    first = tmp_path / "run1"
    assert (
        _label(["--input", str(first_manifest), "--output", str(first), "--model", str(tiny_vit)])
        == EXIT_OK
    )
    assert sorted(r["status"] for r in _rows(first)) == ["fetch_error", "ok", "ok"]
    # The file appears later, and the manifest has grown.
    (images / "late.jpg").write_bytes((photo_dir / "chelsea.jpg").read_bytes())
    manifest = tmp_path / "all.txt"
    manifest.write_text("\n".join(f"images/{n}" for n in [*names, "late.jpg"]) + "\n")
    second = tmp_path / "run2"
    assert (
        _label(
            [
                "--input",
                str(manifest),
                "--output",
                str(second),
                "--model",
                str(tiny_vit),
                "--skip-existing",
                str(first),
            ]
        )
        == EXIT_OK
    )
    labeled = sorted(r["uri"] for r in _rows(second))
    assert labeled == sorted(
        ["images/rocket.jpg", "images/astronaut.png", "images/camera_gray.png", "images/late.jpg"]
    )
    assert all(r["status"] == "ok" for r in _rows(second))
    summary = json.loads((second / SUMMARY_FILE).read_text())
    assert summary["rows_in"] == 6 and summary["rows_skipped"] == 2
    assert summary["rows_out"] == 4


def test_a_different_model_reuses_nothing(
    tiny_vit: Path, tiny_multilabel: Path, photo_dir: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{photo_dir / 'chelsea.jpg'}\n{photo_dir / 'coffee.png'}\n")
    first = tmp_path / "run1"
    assert (
        _label(["--input", str(manifest), "--output", str(first), "--model", str(tiny_vit)])
        == EXIT_OK
    )
    second = tmp_path / "run2"
    assert (
        _label(
            [
                "--input",
                str(manifest),
                "--output",
                str(second),
                "--model",
                str(tiny_multilabel),
                "--skip-existing",
                str(first),
            ]
        )
        == EXIT_OK
    )
    summary = json.loads((second / SUMMARY_FILE).read_text())
    assert summary["rows_skipped"] == 0 and summary["rows_out"] == 2


def test_skip_existing_errors(
    tiny_vit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.txt"
    manifest.write_text("a.jpg\n")
    base = ["--input", str(manifest), "--model", str(tiny_vit)]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _label(base + ["--output", str(tmp_path / "o"), "--skip-existing", str(empty)]) == (
        EXIT_BAD_CONFIG
    )
    assert "holds no part-" in capsys.readouterr().err
    assert _label(base + ["--output", str(empty), "--skip-existing", str(empty)]) == (
        EXIT_BAD_CONFIG
    )
    assert "lies in --output" in capsys.readouterr().err
