"""Results a user can trust: reference-exact by default, never a silently random model.

- The default path (exact decoding) gives `transformers.pipeline`'s labels and
  scores (1e-4, identical top-k lists) on real photos from 500x375 to beyond
  3000x2000, for every input kind: URIs, embedded Parquet bytes, PIL images
  through the API; for the default classifier and for zero-shot CLIP and SigLIP.
- A checkpoint without a head for the task is never run with a random one.
- summary.json says which device, precision, decode and batch size ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.label_images import EXIT_BAD_CONFIG
from pipelines.output import SUMMARY_FILE
from tests.conftest import read_output, real_photo, run_job
from transforms.model.loading import ModelLoadError

TOL = 1e-4
SIZES = ((500, 375), (1024, 768), (3000, 2000), (4032, 3024))
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
LABELS = ("cat", "coffee cup", "astronaut", "rocket", "dog")


@pytest.fixture(scope="module")
def sized_photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real photos as JPEGs of every size the issue names, one photo per size and more."""
    root = tmp_path_factory.mktemp("sized")
    paths = []
    for i, (w, h) in enumerate(SIZES):
        for j in range(2):
            name = PHOTOS[(i + j) % len(PHOTOS)]
            path = root / f"{name}_{w}x{h}.jpg"
            real_photo(name).resize((w, h), Image.Resampling.BICUBIC).save(path, quality=90)
            paths.append(path)
    return paths


def _manifest(paths: list[Path], tmp_path: Path) -> Path:
    manifest = tmp_path / "images.txt"
    manifest.write_text("\n".join(str(p) for p in paths) + "\n")
    return manifest


def _by_uri(directory: Path) -> dict[str, dict[str, Any]]:
    rows = read_output(directory).to_pylist()
    return {r["uri"]: r for r in rows}


def _assert_matches(labels: list[str], scores: list[float], seed: list[dict[str, Any]]) -> None:
    assert labels == [d["label"] for d in seed]
    assert scores == pytest.approx([d["score"] for d in seed], abs=TOL)


@pytest.mark.slow
def test_default_job_equals_transformers_pipeline_on_photos_of_every_size(
    sized_photos: list[Path], tmp_path: Path
) -> None:
    from transformers import pipeline

    from transforms.api import classify
    from transforms.model.default_model import default_model_dir

    seed = pipeline("image-classification", model=str(default_model_dir()), device="cpu")
    expected = {str(p): seed(str(p), top_k=5) for p in sized_photos}

    # URIs through the default job (no decode flag: exact is the default).
    out = tmp_path / "uris"
    assert run_job(["--input", str(_manifest(sized_photos, tmp_path)), "--output", str(out)]) == 0
    rows = _by_uri(out)
    assert len(rows) == len(sized_photos)
    for path, reference in expected.items():
        assert rows[path]["status"] == "ok"
        _assert_matches(rows[path]["labels"], rows[path]["scores"], reference)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["config"]["effective"]["decode"] == "exact"

    # Embedded bytes in Parquet.
    table = pa.table(
        {"name": [str(p) for p in sized_photos], "image": [p.read_bytes() for p in sized_photos]}
    )
    pq.write_table(table, tmp_path / "embedded.parquet")
    out = tmp_path / "embedded"
    assert run_job(["--input", str(tmp_path / "embedded.parquet"), "--output", str(out)]) == 0
    for row in read_output(out).to_pylist():
        _assert_matches(row["labels"], row["scores"], expected[row["name"]])

    # PIL images through the Python API.
    images = [Image.open(p) for p in sized_photos]
    results: list[list[dict[str, Any]]] = classify(images, top_k=5)
    for photo, result in zip(sized_photos, results, strict=True):
        _assert_matches(
            [d["label"] for d in result], [d["score"] for d in result], expected[str(photo)]
        )


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny_clip", "tiny_siglip"])
def test_zero_shot_job_equals_transformers_pipeline_on_photos_of_every_size(
    request: pytest.FixtureRequest, model_name: str, sized_photos: list[Path], tmp_path: Path
) -> None:
    """No --task: a CLIP/SigLIP checkpoint given candidate labels runs zero-shot."""
    from transformers import pipeline

    model_dir = request.getfixturevalue(model_name)
    seed = pipeline("zero-shot-image-classification", model=str(model_dir), device="cpu")
    out = tmp_path / "out"
    args = [
        "--input",
        str(_manifest(sized_photos, tmp_path)),
        "--output",
        str(out),
        "--model",
        str(model_dir),
        "--candidate-labels",
        ",".join(LABELS),
        "--top-k",
        "0",
    ]
    assert run_job(args) == 0
    rows = _by_uri(out)
    for path in sized_photos:
        reference = seed(str(path), candidate_labels=list(LABELS))
        _assert_matches(rows[str(path)]["labels"], rows[str(path)]["scores"], reference)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["config"]["effective"]["task"] == "zero-shot-image-classification"


@pytest.mark.slow
def test_fast_decode_is_an_opt_in_that_changes_pixels(
    sized_photos: list[Path], tiny_vit: Path, tmp_path: Path
) -> None:
    manifest = _manifest(sized_photos, tmp_path)
    common = ["--input", str(manifest), "--model", str(tiny_vit), "--top-k", "0"]
    assert run_job([*common, "--output", str(tmp_path / "exact")]) == 0
    assert run_job([*common, "--output", str(tmp_path / "fast"), "--fast-decode"]) == 0
    exact, fast = _by_uri(tmp_path / "exact"), _by_uri(tmp_path / "fast")
    summary = json.loads((tmp_path / "fast" / SUMMARY_FILE).read_text())
    assert summary["config"]["effective"]["decode"] == "fast"
    metadata = pq.read_schema(next((tmp_path / "fast").glob("part-*.parquet"))).metadata
    assert metadata[b"image_labeler.decode"] == b"fast"
    # Draft decoding only kicks in for JPEGs well above the model input: the large
    # photos get other pixels, hence other scores.
    large = [str(p) for p in sized_photos if "3000x2000" in p.name or "4032" in p.name]
    assert any(
        max(abs(a - b) for a, b in zip(exact[u]["scores"], fast[u]["scores"], strict=True)) > 1e-6
        for u in large
    )


# ---- never a silently random model -------------------------------------------------


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def headless_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT base model checkpoint: no classifier weights."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = tmp_path_factory.mktemp("headless-vit")
    config = ViTConfig(  # type: ignore[call-arg]
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
    )
    ViTModel(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_clip_without_task_or_labels_exits_2_saying_what_to_pass(
    tiny_clip: Path, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["--input", str(_manifest([photo_dir / "chelsea.jpg"], tmp_path)), "--output", str(out)]
    assert run_job([*args, "--model", str(tiny_clip)]) == EXIT_BAD_CONFIG
    err = _one_line(capsys)
    assert "no classification head" in err and "--candidate-labels" in err
    assert not out.exists()


def test_clip_as_a_classifier_names_the_missing_weights(
    tiny_clip: Path, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "--input",
        str(_manifest([photo_dir / "chelsea.jpg"], tmp_path)),
        "--output",
        str(tmp_path / "out"),
    ]
    code = run_job([*args, "--model", str(tiny_clip), "--task", "image-classification"])
    assert code == EXIT_BAD_CONFIG
    err = _one_line(capsys)
    assert "classifier." in err and "random" in err and "zero-shot" in err


def test_missing_head_weights_are_refused_everywhere(
    headless_vit: Path, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transforms.api import LabelImages, classify

    args = [
        "--input",
        str(_manifest([photo_dir / "chelsea.jpg"], tmp_path)),
        "--output",
        str(tmp_path / "out"),
    ]
    assert run_job([*args, "--model", str(headless_vit)]) == EXIT_BAD_CONFIG
    err = _one_line(capsys)
    assert "classifier.bias" in err and "classifier.weight" in err
    with pytest.raises(ModelLoadError, match="classifier.weight"):
        LabelImages(model=str(headless_vit))
    with pytest.raises(ModelLoadError, match="classifier.weight"):
        classify(str(photo_dir / "chelsea.jpg"), model=str(headless_vit))


def test_summary_records_the_settings_that_ran(
    tiny_vit: Path, photo_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    manifest = _manifest(sorted(photo_dir.glob("*.jpg")), tmp_path)
    assert run_job(["--input", str(manifest), "--output", str(out), "--model", str(tiny_vit)]) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["config"]["effective"] == {
        "task": "image-classification",
        "device": "cpu",  # --device auto, resolved on this GPU-less machine
        "precision": "fp32",
        "quantize": "none",
        "decode": "exact",
        "batch_size": 4,
        "threshold": None,
        "embeddings": False,
    }
    assert summary["config"]["device"] == "auto" and summary["config"]["fast_decode"] is False
