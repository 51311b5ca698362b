"""The output folder is a dataset: read as-is by pandas, pyarrow, DuckDB, HF datasets and
Spark's rule; each row exactly once after retried bundles, kills and resumes; file modes
that follow the umask; timing that counts the job's own process."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import label_images
from pipelines.label_images import EXIT_JOB_FAILED, EXIT_OK
from pipelines.output import (
    META_DIR,
    REPORT_FILE,
    SUMMARY_FILE,
    dedupe_parts,
    file_mode,
    write_atomic,
)
from tests.conftest import kill_when_committed, read_output, run_cli, run_job, start_cli
from tests.faults import FailingCommits, RetryingRunner, committed_ever

REPO = Path(__file__).resolve().parents[1]
KEY = ("source_file", "source_row")


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def _keys(out: Path) -> Counter[tuple[str, int]]:
    """How often each input row is in the part files on disk (duplicates included)."""
    keys: Counter[tuple[str, int]] = Counter()
    for part in _parts(out):
        for row in pq.read_table(part, columns=list(KEY)).to_pylist():
            keys[(row["source_file"], row["source_row"])] += 1
    return keys


def _by_key(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    rows = read_output(out).to_pylist()
    keyed = {(r["source_file"], r["source_row"]): r for r in rows}
    assert len(keyed) == len(rows), "a row is in the output twice"
    return keyed


def _assert_equal_rows(out: Path, reference: Path) -> None:
    """Each input row once, with the labels of an uninterrupted run."""
    got, want = _by_key(out), _by_key(reference)
    assert sorted(got) == sorted(want)
    for key, row in got.items():
        ref = want[key]
        assert (row["status"], row["label"], row["labels"], row["error"]) == (
            ref["status"],
            ref["label"],
            ref["labels"],
            ref["error"],
        ), key
        if row["scores"] is not None:
            assert row["scores"] == pytest.approx(ref["scores"], abs=1e-6)


@pytest.fixture(scope="module")
def manifest(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 rows of real photos, every 13th a missing file (an error row)."""
    photos = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    lines = [photos[i % len(photos)] if i % 13 else f"missing-{i}.jpg" for i in range(40)]
    path = tmp_path_factory.mktemp("contract") / "images.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(manifest: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["--input", str(manifest), "--output", str(out), "--model", str(model), *extra]


@pytest.fixture(scope="module")
def reference(manifest: Path, tiny_vit: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the same job."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert run_job(_args(manifest, out, tiny_vit)) == EXIT_OK
    return out


# ---- the folder reads as one table -----------------------------------------------------


def _spark_visible(root: Path) -> list[str]:
    """The files Spark and Hadoop read from a folder: their listing skips every file
    and folder whose name starts with `_` or `.` (Spark's
    `HadoopFSUtils.shouldFilterOutPathName`, which keeps only `_metadata` and
    `_common_metadata`, and folders with `=`, partitions)."""

    def hidden(name: str) -> bool:
        keep = name in ("_metadata", "_common_metadata") or "=" in name
        return (name.startswith(("_", ".")) and not keep) or name.endswith("._COPYING_")

    found = []
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if path.is_file() and not any(hidden(p) for p in parts):
            found.append(str(path.relative_to(root)))
    return sorted(found)


@pytest.mark.slow
def test_finished_output_reads_as_one_table_in_every_reader(
    manifest: Path, tiny_vit: Path, tmp_path: Path
) -> None:
    import datasets
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    out = tmp_path / "out"
    assert run_job(_args(manifest, out, tiny_vit, "--embeddings", "--commit-every", "7")) == 0
    assert (out / SUMMARY_FILE).is_file() and (out / REPORT_FILE).is_file()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert (summary["rows_by_status"]["ok"], summary["rows_by_status"]["fetch_error"]) == (36, 4)
    parts = [p.name for p in _parts(out)]
    assert len(parts) > 1 and sorted(parts) == sorted(summary["output_files"])
    expected = pq.ParquetDataset([str(out / p) for p in parts]).read()
    assert expected.num_rows == 40
    key = sorted(
        zip(expected["source_row"].to_pylist(), expected["status"].to_pylist(), strict=True)
    )

    frame = pd.read_parquet(out)
    assert len(frame) == 40 and list(frame.columns) == expected.column_names
    assert sorted(zip(frame["source_row"], frame["status"], strict=True)) == key

    dataset = ds.dataset(out, format="parquet")
    assert sorted(Path(f).name for f in dataset.files) == sorted(parts)
    assert dataset.to_table().num_rows == 40

    hf = datasets.load_dataset(str(out), split="train")
    hf_dir = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    for loaded in (hf, hf_dir):
        assert loaded.num_rows == 40
        assert loaded.column_names == expected.column_names
        assert sorted(zip(loaded["source_row"], loaded["status"], strict=True)) == key
        assert len(next(r for r in loaded if r["status"] == "ok")["embedding"]) == 32

    count, errors = duckdb.execute(
        f"select count(*), count(*) filter (where status <> 'ok') "
        f"from read_parquet('{out}/**/*.parquet')"
    ).fetchall()[0]
    assert (count, errors) == (40, 4)

    assert _spark_visible(out) == sorted(parts)


@pytest.mark.slow
def test_gcs_output_reads_as_one_table(gcs_emulator: str, manifest: Path, tiny_vit: Path) -> None:
    import fsspec
    import pandas as pd
    import pyarrow.dataset as ds

    out = f"gs://{gcs_emulator}/contract/out"
    assert run_job(["--input", str(manifest), "--output", out, "--model", str(tiny_vit)]) == 0
    fs, root = fsspec.core.url_to_fs(out)
    fs.invalidate_cache()
    assert fs.exists(f"{root}/{SUMMARY_FILE}") and fs.exists(f"{root}/{REPORT_FILE}")
    # Through gcsfs (it follows STORAGE_EMULATOR_HOST; pyarrow's own GCS client would not).
    assert len(pd.read_parquet(root, filesystem=fs)) == 40
    assert ds.dataset(root, filesystem=fs, format="parquet").to_table().num_rows == 40


# ---- file modes follow the umask -------------------------------------------------------


@pytest.fixture()
def umask_022() -> Any:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_take_the_umask_before_and_after_the_rename(
    tmp_path: Path, umask_022: None
) -> None:
    import fsspec

    fs = fsspec.filesystem("file")
    seen: list[int] = []

    def write(f: Any) -> None:
        (temp,) = [p for p in tmp_path.rglob(".*.tmp")]
        seen.append(stat.S_IMODE(temp.stat().st_mode))
        f.write(b"x")

    write_atomic(fs, str(tmp_path / META_DIR / "summary.json"), write)
    assert seen == [0o644]
    assert stat.S_IMODE((tmp_path / META_DIR / "summary.json").stat().st_mode) == 0o644
    os.umask(0o077)
    assert file_mode() == 0o600
    write_atomic(fs, str(tmp_path / "private"), lambda f: f.write(b"x"))
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600


@pytest.mark.slow
def test_every_file_of_an_output_is_readable_by_others_under_umask_022(
    manifest: Path, tiny_vit: Path, tmp_path: Path, umask_022: None
) -> None:
    out = tmp_path / "out"
    assert run_job(_args(manifest, out, tiny_vit, "--commit-every", "9")) == EXIT_OK
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 4  # parts, the summary and the report
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o644 for p in files}
    assert stat.S_IMODE((out / META_DIR).stat().st_mode) == 0o755


# ---- exactly once under retries, kills and resumes --------------------------------------


def _retrying_job(
    args: list[str], mode: str, faults: Path, monkeypatch: pytest.MonkeyPatch, **failing: Any
) -> int:
    """The job on `RetryingRunner`, with `FailingCommits` in place of `WriteParts`."""
    faults.mkdir(exist_ok=True)
    # Worker processes import tests.faults (the DoFn is pickled by reference).
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setattr(
        label_images,
        "WriteParts",
        lambda *a, **k: FailingCommits(*a, faults=str(faults), **failing, **k),
    )
    options = PipelineOptions(["--direct_num_workers", "2", "--direct_running_mode", mode])
    pipeline = beam.Pipeline(runner=RetryingRunner(options, faults), options=options)
    return label_images.run(
        [*args, "--progress", "false"], save_main_session=False, test_pipeline=pipeline
    )


SMALL_PARTS = ("--commit-every", "3", "--batch-size", "2")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["multi_threading", "multi_processing"])
def test_retried_bundles_leave_each_row_exactly_once(
    mode: str,
    manifest: Path,
    tiny_vit: Path,
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, faults = tmp_path / "out", tmp_path / "faults"
    code = _retrying_job(_args(manifest, out, tiny_vit, *SMALL_PARTS), mode, faults, monkeypatch)
    assert code == EXIT_OK
    failed = list(faults.glob("failed-*"))
    assert failed, "no attempt failed: the test injected nothing"
    summary = json.loads((out / SUMMARY_FILE).read_text())
    parts = {p.name for p in _parts(out)}
    orphans = committed_ever(faults) - parts
    # Every failed (and dropped) attempt committed parts; none of them stayed.
    assert orphans and parts == set(summary["output_files"])
    assert set(_keys(out).values()) == {1} and summary["rows_out"] == 40
    _assert_equal_rows(out, reference)
    print(f"{mode}: {len(failed)} failed attempts, {len(orphans)} orphan parts removed")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["multi_threading", "multi_processing"])
def test_resume_after_a_failed_job_with_retried_bundles_keeps_each_row_once(
    mode: str,
    manifest: Path,
    tiny_vit: Path,
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, faults = tmp_path / "out", tmp_path / "faults"
    args = _args(manifest, out, tiny_vit, *SMALL_PARTS)
    code = _retrying_job(args, mode, faults, monkeypatch, die_after=6)
    assert code == EXIT_JOB_FAILED
    assert not (out / SUMMARY_FILE).exists()
    on_disk = _keys(out)
    duplicates = sum(n - 1 for n in on_disk.values())
    assert duplicates > 0, "the failed job left no duplicate: nothing to de-duplicate"
    monkeypatch.undo()
    assert run_job([*args, "--resume"]) == EXIT_OK
    assert set(_keys(out).values()) == {1}
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rows_in"] == summary["rows_out"] == 40
    assert 0 < summary["rows_resumed"] < 40
    _assert_equal_rows(out, reference)
    print(f"{mode}: {duplicates} duplicate rows on disk before --resume, none after")


def test_dedupe_keeps_one_part_per_row(tmp_path: Path) -> None:
    def part(name: str, rows: list[int], source: str = "a.txt") -> str:
        table = pa.table({"source_file": [source] * len(rows), "source_row": rows})
        pq.write_table(table, tmp_path / name)
        return name

    names = [
        part("part-r-1.parquet", [0, 1, 2]),  # a failed attempt's part ...
        part("part-r-2.parquet", [0, 1, 2, 3]),  # ... and its retry's, larger
        part("part-r-3.parquet", [4, 5]),
        part("part-r-4.parquet", [3, 6]),  # overlaps the retry: dropped, 6 relabeled
        part("part-r-5.parquet", [0, 1], source="b.txt"),  # same rows, another file
    ]
    kept, dropped, rows = dedupe_parts(str(tmp_path), names, _plain_format())
    assert kept == ["part-r-2.parquet", "part-r-3.parquet", "part-r-5.parquet"]
    assert dropped == ["part-r-1.parquet", "part-r-4.parquet"]
    assert rows == 8
    assert dedupe_parts(str(tmp_path), [], _plain_format()) == ([], [], 0)


def _plain_format() -> Any:
    from transforms.rows import RecordFormat

    return RecordFormat(source=True)


@pytest.mark.slow
def test_repeated_kill_9_then_resume_ends_with_the_rows_of_an_uninterrupted_run(
    manifest: Path, tiny_vit: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = _args(manifest, out, tiny_vit, "--commit-every", "2", "--batch-size", "1")
    args += ["--decode-threads", "1"]
    kill_when_committed(out, 2, start_cli(args))
    first = {p.name for p in _parts(out)}
    kill_when_committed(out, len(first) + 2, start_cli([*args, "--resume"]))
    second = {p.name for p in _parts(out)}
    assert first < second and not (out / SUMMARY_FILE).exists()
    done = run_cli([*args, "--resume", "--progress", "false"])
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    assert second <= {p.name for p in _parts(out)}  # committed rows were not labeled again
    assert set(_keys(out).values()) == {1}
    _assert_equal_rows(out, reference)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rows_resumed"] == sum(pq.ParquetFile(out / n).metadata.num_rows for n in second)


# ---- one owner for the output's column names ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["", "p2_"])
def test_skip_existing_reads_an_output_written_with_a_prefix(
    prefix: str, manifest: Path, tiny_vit: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_job(_args(manifest, first, tiny_vit, "--output-prefix", "pred_")) == EXIT_OK
    args = _args(manifest, second, tiny_vit, "--skip-existing", str(first))
    assert run_job([*args, *(["--output-prefix", prefix] if prefix else [])]) == EXIT_OK
    summary = json.loads((second / SUMMARY_FILE).read_text())
    # The 36 ok rows of the first run are skipped; its 4 failures are labeled again.
    assert (summary["rows_skipped"], summary["rows_out"]) == (36, 4)
    assert read_output(second).column(f"{prefix}status").to_pylist() == ["fetch_error"] * 4


# ---- honest timing ----------------------------------------------------------------------


def test_start_is_the_interpreters_even_when_exec_d_after_a_shell_chain() -> None:
    probe = (
        "import time, pipelines.clock as c; print(round(time.time() - c.process_started_at(), 3))"
    )
    shell = f"sleep 1.2 && exec {sys.executable} -c '{probe}'"
    chained = subprocess.run(
        ["bash", "-c", shell], capture_output=True, text=True, cwd=REPO, check=True
    )
    direct = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True
    )
    # The kernel's start of the exec'd process is the shell's, 1.2 s earlier.
    assert float(chained.stdout) < 1.0, chained.stdout
    assert 0 < float(direct.stdout) < 1.0, direct.stdout
