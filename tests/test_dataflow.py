"""DataflowRunner --dry_run: the whole job is built and translated offline.

Input, output, temp and staging locations live on the loopback GCS emulator;
the project is packaged from pyproject.toml by Beam's stager
(`--setup_file`), as the README documents for CPU workers.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pytest

from pipelines.label_images import EXIT_OK, run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_dataflow_dry_run_translates_the_job(
    gcs_emulator: str, tiny_vit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = f"gs://{gcs_emulator}/dry-{uuid.uuid4().hex[:8]}"
    with fsspec.open(f"{root}/manifest.txt", "wt") as f:
        f.write("images/a.jpg\nimages/b.jpg\n")
    job_file = tmp_path / "job.json"
    code = run(
        [
            "--input",
            f"{root}/manifest.txt",
            "--output",
            f"{root}/out",
            "--model",
            str(tiny_vit),
            "--top-k",
            "3",
            "--runner",
            "DataflowRunner",
            "--project",
            "test-project",
            "--region",
            "us-central1",
            "--temp_location",
            f"{root}/tmp",
            "--staging_location",
            f"{root}/staging",
            "--setup_file",
            str(REPO / "pyproject.toml"),
            "--dry_run=True",
            "--no_auth",
            "--dataflow_job_file",
            str(job_file),
        ],
        save_main_session=False,
    )
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err[-3000:]
    assert '"label_images_dry_run": true' in captured.out
    job = json.loads(job_file.read_text())
    names = json.dumps(job)
    for step in (
        "ReadManifest",
        "LabelImages",
        "FetchAndDecode",
        "RunInference",
        "WriteParquet",
        "WriteSummary",
    ):
        assert step in names, f"step {step} is missing from the translated job"
    # A dry run writes nothing to the output directory.
    fs, path = fsspec.core.url_to_fs(f"{root}/out")
    assert not fs.exists(path) or not fs.ls(path)
