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


@pytest.mark.parametrize(
    "models",
    [[], ["--models", "name=cls", "--models", "name=short top_k=1"]],
    ids=["one model", "two models"],
)
def test_dataflow_dry_run_translates_the_job(
    models: list[str],
    gcs_emulator: str,
    tiny_vit: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = f"gs://{gcs_emulator}/dry-{uuid.uuid4().hex[:8]}"
    with fsspec.open(f"{root}/manifest.txt", "wt") as f:
        f.write("images/a.jpg\nimages/b.jpg\n")
    # Dataflow workers cannot see this machine's files: the model goes to gs:// too.
    fs, _ = fsspec.core.url_to_fs(root)
    for path in tiny_vit.iterdir():
        fs.put_file(str(path), f"{root}/model/{path.name}")
    job_file = tmp_path / "job.json"
    code = run(
        [
            "--input",
            f"{root}/manifest.txt",
            "--output",
            f"{root}/out",
            "--model",
            f"{root}/model",
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
            *models,
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
    if models:  # one decode, then each model's own RunInference
        assert "RunInference[cls]" in names and "RunInference[short]" in names
    # A dry run writes nothing to the output directory.
    fs, path = fsspec.core.url_to_fs(f"{root}/out")
    assert not fs.exists(path) or not fs.ls(path)


DATAFLOW = [
    "--runner",
    "DataflowRunner",
    "--project",
    "p",
    "--region",
    "us-central1",
    "--temp_location",
    "gs://b/tmp",
    "--dry_run=True",
    "--no_auth",
]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input", "local.txt", "--output", "gs://b/out"], "--input local.txt is a local path"),
        (["--input", "gs://b/m.txt", "--output", "out"], "--output out is a local path"),
        (
            ["--input", "gs://b/m.txt", "--output", "gs://b/o", "--model", str(REPO)],
            "is a local directory",
        ),
        (
            ["--input", "gs://b/m.txt", "--output", "gs://b/o", "--models", f"name=a model={REPO}"],
            "models[0] (a): --model",
        ),
    ],
)
def test_dataflow_refuses_local_paths(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run([*argv, *DATAFLOW], save_main_session=False) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("missing", ["--project", "--region", "--temp_location"])
def test_dataflow_needs_project_region_and_temp_location(
    missing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = list(DATAFLOW)
    index = args.index(missing)
    del args[index : index + 2]
    code = run(["--input", "gs://b/m.txt", "--output", "gs://b/o", *args], save_main_session=False)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert missing in err and len(err.splitlines()) == 1, err
