"""Tier 4: a whole job on gs:// against a GCS emulator on loopback.

Manifest, images and output all live on gs://, through the same code paths
Dataflow uses: gcsfs for reading and fetching, Beam's own gcsio for the
Parquet shards.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from pipelines.label_images import EXIT_BAD_CONFIG, EXIT_OK, run
from pipelines.output import SUMMARY_FILE

pytestmark = pytest.mark.slow


def _put(uri: str, data: bytes) -> None:
    with fsspec.open(uri, "wb") as f:
        f.write(data)


def _read_output(prefix: str) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(prefix)
    files = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    assert files, f"no shards under {prefix}"
    rows: list[dict] = []
    for path in files:
        with fs.open(path, "rb") as f:
            rows += pq.read_table(io.BytesIO(f.read())).to_pylist()
    return rows


def test_full_job_on_gcs(
    gcs_emulator: str, tiny_vit: Path, photo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = f"gs://{gcs_emulator}/{uuid.uuid4().hex[:8]}"
    for name in ("chelsea.jpg", "coffee.png", "rocket.jpg"):
        _put(f"{root}/images/{name}", (photo_dir / name).read_bytes())
    # Relative entries resolve against the manifest's gs:// folder.
    manifest = "images/chelsea.jpg\nimages/coffee.png\n" + f"{root}/images/rocket.jpg\n"
    manifest += "images/missing.jpg\nimages/chelsea.jpg\n"
    _put(f"{root}/manifest.txt", manifest.encode())
    out = f"{root}/out"
    args = [
        "--input",
        f"{root}/manifest.txt",
        "--output",
        out,
        "--model",
        str(tiny_vit),
        "--progress",
        "false",
    ]
    assert run(args, save_main_session=False) == EXIT_OK
    rows = _read_output(out)
    assert len(rows) == 5
    by_status = sorted(r["status"] for r in rows)
    assert by_status == ["fetch_error", "ok", "ok", "ok", "ok"]
    missing = next(r for r in rows if r["status"] == "fetch_error")
    assert missing["error"].startswith("not_found: ")
    with fsspec.open(f"{out}/{SUMMARY_FILE}", "rt") as f:
        summary = json.load(f)
    assert summary["rows_out"] == 5 and summary["errors_by_code"] == {"not_found": 1}
    # A rerun without --overwrite is refused; with it, one set of files remains.
    assert run(args, save_main_session=False) == EXIT_BAD_CONFIG
    assert "not empty" in capsys.readouterr().err
    assert run(args + ["--overwrite", "--num-shards", "1"], save_main_session=False) == EXIT_OK
    fs, path = fsspec.core.url_to_fs(out)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    # One shard of this run, the summary and the report; the run marker is gone.
    assert len(names) == 2 and names[0] == "__label_images__", names
    assert names[1].startswith("part-") and names[1].endswith("-00000-of-00001.parquet")
    meta = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{path}/__label_images__", detail=False))
    assert meta == ["labels.json", "report.html", "summary.json"], meta


def test_missing_gcs_manifest_is_a_clear_error(
    gcs_emulator: str, tiny_vit: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        [
            "--input",
            f"gs://{gcs_emulator}/nope/manifest.txt",
            "--output",
            f"gs://{gcs_emulator}/nope-out",
            "--model",
            str(tiny_vit),
        ],
        save_main_session=False,
    )
    assert code == EXIT_BAD_CONFIG
    assert "does not exist" in capsys.readouterr().err


def test_webdataset_shards_on_gcs(gcs_emulator: str, tiny_vit: Path, photo_dir: Path) -> None:
    """Brace-pattern shards on gs://, streamed; a missing shard is a not_found row."""
    import tarfile

    root = f"gs://{gcs_emulator}/{uuid.uuid4().hex[:8]}"
    for shard, names in enumerate((("chelsea.jpg", "coffee.png"), ("rocket.jpg",))):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for i, name in enumerate(names):
                data = (photo_dir / name).read_bytes()
                info = tarfile.TarInfo(f"{shard}{i:03d}.{name.rsplit('.', 1)[1]}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        _put(f"{root}/shards/{shard:06d}.tar", buffer.getvalue())
    out = f"{root}/out"
    args = ["--input", f"{root}/shards/{{000000..000002}}.tar", "--output", out]
    args += ["--model", str(tiny_vit), "--progress", "false"]
    assert run(args, save_main_session=False) == EXIT_OK
    rows = _read_output(out)
    assert sorted((r["__key__"] or "", r["status"]) for r in rows) == [
        ("", "fetch_error"),
        ("0000", "ok"),
        ("0001", "ok"),
        ("1000", "ok"),
    ]
    missing = next(r for r in rows if r["__key__"] is None)
    assert missing["error"].startswith("not_found:") and missing["__url__"].endswith("000002.tar")
