"""Where users' data is: img2dataset's outputs (made by img2dataset itself from a loopback
HTTP server) and Hugging Face `datasets` folders and Arrow files (made by `datasets`),
labeled with no extra flag and exactly like a plain manifest of the same images."""

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

from pipelines import export
from pipelines.label_images import EXIT_OK
from pipelines.output import SUMMARY_FILE
from tests.conftest import read_output, run_job
from tests.http_server import serve

pytestmark = pytest.mark.slow

#: img2dataset's own columns, which must come out unchanged and under their names.
IMG2DATASET_COLUMNS: tuple[str, ...] = ("key", "url", "caption", "status", "error_message")
IMG2DATASET_COLUMNS += ("width", "height", "sha256")


def _their_parquet(folder: Path) -> pa.Table:
    """img2dataset's own Parquet files of a folder (beside its *_stats.json)."""
    return pq.ParquetDataset(sorted(str(p) for p in folder.glob("*.parquet"))).read()


def _img2dataset(urls: Path, output_format: str, out: Path) -> None:
    """Run img2dataset itself (a subprocess: it starts its own worker processes)."""
    options = {
        "url_list": str(urls),
        "input_format": "tsv",
        "url_col": "url",
        "caption_col": "caption",
        "output_format": output_format,
        "output_folder": str(out),
        "processes_count": 1,
        "thread_count": 4,
        "number_sample_per_shard": 4,  # two shards
        "resize_mode": "no",
        "timeout": 5,
        "retries": 0,
        "enable_wandb": False,
        "disallowed_header_directives": [],
    }
    code = "import json, sys, img2dataset; img2dataset.download(**json.loads(sys.argv[1]))"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(options)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def img2dataset_outputs(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """img2dataset's Parquet and WebDataset outputs of 6 URLs, one of them a 404."""
    root = tmp_path_factory.mktemp("img2dataset")
    names = ["chelsea.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg", "coffee.png"]
    images = {n: (photo_dir / n).read_bytes() for n in names}
    with serve(images) as server:
        host, port = server.server_address[:2]
        base = f"http://{host!s}:{port}"
        lines = [f"{base}/img/{n}\tcaption of {n}" for n in names]
        lines.insert(2, f"{base}/missing/gone.jpg\ta failed download")
        urls = root / "urls.tsv"
        urls.write_text("url\tcaption\n" + "\n".join(lines) + "\n")
        for fmt in ("parquet", "webdataset"):
            _img2dataset(urls, fmt, root / fmt)
    return root


@pytest.fixture(scope="module")
def reference_by_key(
    img2dataset_outputs: Path, tiny_vit: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """The labels of a plain manifest of the images img2dataset stored, by its key."""
    root = tmp_path_factory.mktemp("img2dataset-reference")
    table = _their_parquet(img2dataset_outputs / "parquet")
    lines = []
    for row in table.to_pylist():
        if row["jpg"] is not None:
            (root / f"{row['key']}.jpg").write_bytes(row["jpg"])
            lines.append(f"{row['key']}.jpg")
    (root / "manifest.txt").write_text("\n".join(lines) + "\n")
    out = root / "out"
    assert (
        run_job(
            ["--input", str(root / "manifest.txt"), "--output", str(out), "--model", str(tiny_vit)]
        )
        == 0
    )
    return {Path(r["uri"]).stem: r for r in read_output(out).to_pylist()}


def _same_labels(rows: list[dict[str, Any]], reference: dict[str, dict[str, Any]], key: str) -> int:
    compared = 0
    for row in rows:
        if row[key] in reference and row["label"] is not None:
            ref = reference[row[key]]
            assert row["labels"] == ref["labels"], row[key]
            assert row["scores"] == pytest.approx(ref["scores"], abs=1e-6)
            compared += 1
    return compared


def test_img2dataset_parquet_output_labels_with_no_flag(
    img2dataset_outputs: Path, tiny_vit: Path, reference_by_key: dict, tmp_path: Path
) -> None:
    source = _their_parquet(img2dataset_outputs / "parquet")
    out = tmp_path / "out"
    args = ["--input", str(img2dataset_outputs / "parquet"), "--output", str(out)]
    assert run_job([*args, "--model", str(tiny_vit)]) == EXIT_OK
    rows = read_output(out).to_pylist()
    assert len(rows) == source.num_rows == 6
    # Its own columns come out unchanged; our row status takes label_status/label_error.
    theirs = {r["key"]: r for r in source.to_pylist()}
    for row in rows:
        assert {c: row[c] for c in IMG2DATASET_COLUMNS} == {
            c: theirs[row["key"]][c] for c in IMG2DATASET_COLUMNS
        }
    failed = [r for r in rows if r["status"] == "failed_to_download"]
    assert len(failed) == 1 and failed[0]["label_status"] == "invalid_input"
    assert failed[0]["label_error"].startswith("empty_uri: ")
    assert _same_labels(rows, reference_by_key, "key") == 5
    metadata = pq.read_schema(next(out.glob("part-*.parquet"))).metadata
    assert metadata[b"image_labeler.status_prefix"] == b"label_"


def test_img2dataset_webdataset_shards_label_like_the_manifest(
    img2dataset_outputs: Path, tiny_vit: Path, reference_by_key: dict, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shards = str(img2dataset_outputs / "webdataset" / "*.tar")
    assert run_job(["--input", shards, "--output", str(out), "--model", str(tiny_vit)]) == 0
    rows = read_output(out).to_pylist()
    assert len(rows) == 5 and {r["status"] for r in rows} == {"ok"}  # failures are in no shard
    assert _same_labels(rows, reference_by_key, "__key__") == 5


def test_img2dataset_folder_labels_every_row_with_failures_as_error_rows(
    img2dataset_outputs: Path, tiny_vit: Path, reference_by_key: dict, tmp_path: Path
) -> None:
    folder = img2dataset_outputs / "webdataset"
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".tar") == [
        "00000.tar",
        "00001.tar",
    ]
    out = tmp_path / "out"
    assert run_job(["--input", str(folder), "--output", str(out), "--model", str(tiny_vit)]) == 0
    rows = read_output(out).to_pylist()
    source = _their_parquet(folder).to_pylist()  # its per-shard Parquet files
    assert len(rows) == len(source) == 6
    theirs = {r["key"]: r for r in source}
    for row in rows:
        assert {c: row[c] for c in IMG2DATASET_COLUMNS} == {
            c: theirs[row["key"]][c] for c in IMG2DATASET_COLUMNS
        }
        assert row["source_file"].endswith(".parquet") and row["source_row"] is not None
    failed = [r for r in rows if r["label_status"] != "ok"]
    assert [r["status"] for r in failed] == ["failed_to_download"]
    assert failed[0]["label_error"].startswith("no_image: img2dataset row")
    assert "failed_to_download" in failed[0]["label_error"]
    assert _same_labels(rows, reference_by_key, "key") == 5
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rows_in"] == summary["rows_out"] == 6
    # For review in Label Studio its rows point at their source URLs.
    assert export.main(["label-studio", str(out), "--to", str(tmp_path / "ls")]) == 0
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert sorted(t["data"]["image"] for t in tasks) == sorted(
        r["url"] for r in rows if r["label_status"] == "ok"
    )


# ---- Hugging Face datasets -------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dataset(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A `datasets.Dataset` with an Image feature: some rows as bytes, some as paths."""
    import datasets
    from PIL import Image

    photos = sorted(photo_dir.glob("*.jpg")) + sorted(photo_dir.glob("*.png"))
    images: list[Any] = [
        Image.open(p) if i % 2 else str(p) for i, p in enumerate(photos)
    ]  # PIL images are stored as bytes, strings as paths
    data = {"image": images, "name": [p.name for p in photos], "n": list(range(len(photos)))}
    features = datasets.Features(
        {"image": datasets.Image(), "name": datasets.Value("string"), "n": datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict(data, features=features)


def _labels_by_name(out: Path) -> dict[str, tuple[Any, ...]]:
    return {
        r["name"]: (r["status"], r["labels"], r["scores"]) for r in read_output(out).to_pylist()
    }


def _assert_same(got: dict[str, tuple[Any, ...]], want: dict[str, tuple[Any, ...]]) -> None:
    assert sorted(got) == sorted(want)
    for name, (status, labels, scores) in got.items():
        assert (status, labels) == want[name][:2], name
        assert scores == pytest.approx(want[name][2], abs=1e-6)


def test_datasets_save_to_disk_folders_and_arrow_files_label_like_parquet(
    hf_dataset: Any, tiny_vit: Path, tmp_path: Path
) -> None:
    import datasets

    hf_dataset.to_parquet(str(tmp_path / "as.parquet"))
    hf_dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"train": hf_dataset.select(range(4)), "test": hf_dataset.select(range(4, len(hf_dataset)))}
    ).save_to_disk(str(tmp_path / "splits"))
    (arrow,) = sorted((tmp_path / "saved").glob("*.arrow"))
    table = pa.ipc.open_stream(pa.memory_map(str(arrow))).read_all()  # datasets writes streams
    with pa.ipc.new_file(str(tmp_path / "file-format.arrow"), table.schema) as writer:
        writer.write_table(table)

    def label(source: Path) -> dict[str, tuple[Any, ...]]:
        out = tmp_path / f"out-{source.name}"
        assert (
            run_job(["--input", str(source), "--output", str(out), "--model", str(tiny_vit)]) == 0
        )
        return _labels_by_name(out)

    reference = label(tmp_path / "as.parquet")
    assert len(reference) == len(hf_dataset) == 10
    assert {status for status, _, _ in reference.values()} == {"ok"}
    for source in (tmp_path / "saved", arrow, tmp_path / "file-format.arrow", tmp_path / "splits"):
        _assert_same(label(source), reference)
