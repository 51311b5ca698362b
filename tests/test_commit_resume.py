"""Nothing lost, nothing leaked: path guard, incremental atomic commits, resume after
kill -9, redaction, a full disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.label_images import EXIT_BAD_CONFIG, EXIT_OK
from pipelines.output import REPORT_FILE, SUMMARY_FILE
from pipelines.preflight import normalized
from tests.conftest import kill_when_committed, read_output, run_cli, run_job, start_cli
from tests.http_server import serve

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def manifest(photo_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "images.txt"
    path.write_text("\n".join(str(p) for p in sorted(photo_dir.glob("*.jpg"))) + "\n")
    return path


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


# ---- the path guard ----------------------------------------------------------------


def test_normalized_paths() -> None:
    assert normalized("gs://b/out/.") == normalized("gs://b/out/") == "gs://b/out"
    assert normalized("gs://b/x/../out//") == "gs://b/out"
    assert normalized("./a/../b") == os.path.realpath("b")


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["out/.", "./out", "out/", "link-to-out"])
def test_overwrite_never_deletes_what_the_run_reads(
    spelling: str,
    manifest: Path,
    tiny_vit: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["--input", str(manifest), "--model", str(tiny_vit)]
    assert run_job([*base, "--output", "out"]) == EXIT_OK
    (tmp_path / "link-to-out").symlink_to(tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    code = run_job([*base, "--skip-existing", spelling, "--overwrite", "--output", "out"])
    assert code == EXIT_BAD_CONFIG
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--skip-existing" in err and "lies in --output" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    # An input inside the output is refused too.
    (tmp_path / "out" / "list.txt").write_text(manifest.read_text())
    code = run_job(
        ["--input", "out/list.txt", "--model", str(tiny_vit), "--output", "./out/", "--overwrite"]
    )
    assert code == EXIT_BAD_CONFIG
    assert (tmp_path / "out" / "list.txt").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*before, "list.txt"])


# ---- incremental, atomic commits ------------------------------------------------------


@pytest.mark.slow
def test_parts_are_committed_as_the_run_goes(
    manifest: Path, tiny_vit: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["--input", str(manifest), "--output", str(out), "--model", str(tiny_vit)]
    assert run_job([*args, "--commit-every", "1", "--batch-size", "1"]) == EXIT_OK
    parts = _parts(out)
    assert len(parts) == 4  # one committed file per row
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert sorted(summary["output_files"]) == [p.name for p in parts]
    assert not (out / ".label-images-run.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    rows = read_output(out).to_pylist()
    assert sorted(r["source_row"] for r in rows) == [0, 1, 2, 3]
    assert {r["source_file"] for r in rows} == {str(manifest)}


@pytest.fixture(scope="module")
def many_images(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of 300 image rows (real photos, repeated), a few of them failing."""
    root = tmp_path_factory.mktemp("many")
    photos = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    lines = [photos[i % len(photos)] if i % 37 else f"missing-{i}.jpg" for i in range(300)]
    path = root / "many.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["multi_threading", "multi_processing"])
def test_resume_after_kill_9_ends_with_every_row_exactly_once(
    mode: str, many_images: Path, tiny_vit: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [
        "--input",
        str(many_images),
        "--output",
        str(out),
        "--model",
        str(tiny_vit),
        "--commit-every",
        "5",
        "--batch-size",
        "1",
        "--decode-threads",
        "1",
        "--direct_num_workers",
        "2",
        "--direct_running_mode",
        mode,
    ]
    kill_when_committed(out, 3, start_cli(args))
    assert not (out / SUMMARY_FILE).exists()
    committed = [p for p in _parts(out)]
    before = sum(pq.ParquetFile(p).metadata.num_rows for p in committed)
    assert 0 < before < 300
    # Without --resume the interrupted run is not silently mixed into a new one.
    plain = run_cli([*args, "--progress", "false"])
    assert plain.returncode == EXIT_BAD_CONFIG and "--resume" in plain.stderr
    resumed = run_cli([*args, "--resume", "--progress", "false"])
    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    rows = read_output(out).to_pylist()
    keys = Counter((r["source_file"], r["source_row"]) for r in rows)
    assert len(rows) == 300 and set(keys.values()) == {1}
    assert sorted(r["source_row"] for r in rows) == list(range(300))
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rows_resumed"] == before
    assert summary["rows_in"] == summary["rows_out"] == 300
    assert summary["rows_by_status"]["fetch_error"] == 9  # rows 0, 37, ... 296
    for part in committed:  # the parts committed before the kill were kept as they were
        assert part.exists()


@pytest.mark.slow
def test_overwrite_keeps_the_previous_output_until_it_commits(
    many_images: Path, manifest: Path, tiny_vit: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert run_job(["--input", str(manifest), "--output", str(out), "--model", str(tiny_vit)]) == 0
    old = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert SUMMARY_FILE in old and REPORT_FILE in old
    job = start_cli(
        [
            "--input",
            str(many_images),
            "--output",
            str(out),
            "--model",
            str(tiny_vit),
            "--overwrite",
            "--commit-every",
            "5",
            "--batch-size",
            "1",
        ]
    )
    kill_when_committed(out, len([n for n in old if n.startswith("part-")]) + 2, job)
    for name, data in old.items():  # the complete previous output is untouched
        assert (out / name).read_bytes() == data
    code = run_job(
        ["--input", str(many_images), "--output", str(out), "--model", str(tiny_vit), "--overwrite"]
    )
    assert code == EXIT_OK
    assert read_output(out).num_rows == 300  # only the new run's rows remain


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare -m as root"
)
def test_a_full_disk_fails_the_job_and_leaves_no_partial_file(
    many_images: Path, tiny_vit: Path, tmp_path: Path
) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    script = (
        f"mount -t tmpfs -o size=96k tmpfs {mount} && cd {REPO} && "
        f"{sys.executable} -m pipelines.label_images --input {many_images} "
        f"--output {mount}/out --model {tiny_vit} --commit-every 5 --progress false; "
        f"echo EXIT=$?; ls -laR {mount}/out; "
        f'{sys.executable} -c "import pathlib, pyarrow.parquet as pq, sys; '
        f"parts = sorted(pathlib.Path('{mount}/out').glob('part-*.parquet')); "
        f"[pq.read_table(p) for p in parts]; print('READABLE', len(parts)); "
        f"print('EMPTY', sum(1 for p in pathlib.Path('{mount}/out').iterdir() "
        f"if p.stat().st_size == 0 and not p.name.startswith('.')))\""
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout
    assert "EXIT=1" in out, out + proc.stderr[-2000:]
    assert "READABLE" in out, out + proc.stderr[-2000:]  # every final-name part is whole
    assert "EMPTY 0" in out, out
    assert "summary.json" not in out.split("EXIT=1", 1)[1].split("READABLE", 1)[0]


# ---- redaction --------------------------------------------------------------------------


@pytest.mark.slow
def test_credentials_in_uris_never_reach_what_the_tool_writes(
    photo_dir: Path, tiny_vit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = "\n".join(
        [str(photo_dir / "chelsea.jpg"), "https://user:hunter2@127.0.0.1:9/x.jpg?token=SECRET1"]
    )
    with serve({"list.txt": (lines + "\n").encode()}) as server:
        host, port = server.server_address[:2]
        url = f"http://user:hunter2@{host!s}:{port}/img/list.txt?X-Goog-Signature=SECRET2"
        out = tmp_path / "out"
        code = run_job(
            [
                "--input",
                url,
                "--input-format",
                "text",
                "--output",
                str(out),
                "--model",
                str(tiny_vit),
                "--fetch-retries",
                "0",
            ]
        )
    assert code == EXIT_OK
    written = (out / SUMMARY_FILE).read_text()
    table = read_output(out)
    generated = [
        c
        for c in table.column_names
        if c != "uri"  # the passthrough column is the user's
    ]
    text = written + json.dumps(table.select(generated).to_pylist()) + capsys.readouterr().err
    for secret in ("hunter2", "SECRET1", "SECRET2"):
        assert secret not in text
    assert "X-Goog-Signature" not in text
    assert any("SECRET1" in (u or "") for u in table.column("uri").to_pylist())
