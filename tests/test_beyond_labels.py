"""What teams do right after labeling: embeddings, multi-label tags, WebDataset shards.

- `--embeddings`: an L2-normalized `embedding` column from the same forward
  pass, equal (cosine >= 0.9999) to what transformers computes: CLIP/SigLIP
  `get_image_features`, and for classifiers the input of the head.
- `--threshold`: `labels`/`scores` keep every label scoring at least T (up to
  `--top-k`), as `transformers.pipeline(..., top_k=None)` filtered by T.
- WebDataset tar shards as `--input`: one row per sample, streamed; labels
  equal to the same images labeled from a manifest.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.label_images import EXIT_BAD_CONFIG
from tests.conftest import read_output, run_job
from transforms.images.sources.plan import match_files
from transforms.images.sources.webdataset import split_name
from transforms.model.postprocess import top_k_predictions

PHOTOS = ("chelsea.jpg", "coffee.jpg", "astronaut.png", "rocket.jpg", "camera_gray.png")
LABELS = ("cat", "coffee cup", "astronaut", "rocket", "dog", "camera")


def _manifest(photo_dir: Path, tmp_path: Path, names: tuple[str, ...] = PHOTOS) -> Path:
    manifest = tmp_path / "images.txt"
    manifest.write_text("".join(f"{photo_dir / n}\n" for n in names))
    return manifest


def _by_uri(directory: Path) -> dict[str, dict[str, Any]]:
    return {r["uri"]: r for r in read_output(directory).to_pylist()}


def _cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---- embeddings --------------------------------------------------------------------


def _reference_embedding(model_dir: Path, kind: str, path: Path) -> np.ndarray:
    """What transformers computes for one image file, without our code."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification
    from transformers.image_utils import load_image

    processor = AutoImageProcessor.from_pretrained(model_dir)
    pixel_values = processor(images=load_image(str(path)), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        if kind == "zero-shot":
            model = AutoModel.from_pretrained(model_dir).eval()
            out = model.get_image_features(pixel_values=pixel_values)
            features = getattr(out, "pooler_output", out)
        elif kind == "vit":  # ViTForImageClassification: classifier(last_hidden_state[:, 0])
            model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
            features = model.vit(pixel_values).last_hidden_state[:, 0]
        elif kind == "resnet":  # ResNetForImageClassification: classifier(pooler_output)
            model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
            features = model.resnet(pixel_values).pooler_output.flatten(1)
        else:  # timm: the head's input is forward_head(..., pre_logits=True)
            timm_model = AutoModelForImageClassification.from_pretrained(model_dir).timm_model
            timm_model.eval()
            features = timm_model.forward_head(
                timm_model.forward_features(pixel_values), pre_logits=True
            )
    return np.asarray(features[0].float().numpy())


@pytest.mark.parametrize(
    ("model_name", "kind", "extra"),
    [
        ("tiny_vit", "vit", []),
        pytest.param("tiny_resnet", "resnet", [], marks=pytest.mark.slow),
        pytest.param(
            "tiny_clip",
            "zero-shot",
            ["--candidate-labels", ",".join(LABELS)],
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "tiny_siglip",
            "zero-shot",
            ["--candidate-labels", ",".join(LABELS)],
            marks=pytest.mark.slow,
        ),
    ],
)
def test_embeddings_equal_transformers_and_leave_labels_unchanged(
    request: pytest.FixtureRequest,
    model_name: str,
    kind: str,
    extra: list[str],
    photo_dir: Path,
    tmp_path: Path,
) -> None:
    model_dir = request.getfixturevalue(model_name)
    manifest = _manifest(photo_dir, tmp_path)
    common = ["--input", str(manifest), "--model", str(model_dir), "--top-k", "0", *extra]
    assert run_job([*common, "--output", str(tmp_path / "plain")]) == 0
    assert run_job([*common, "--output", str(tmp_path / "emb"), "--embeddings"]) == 0
    plain, emb = _by_uri(tmp_path / "plain"), _by_uri(tmp_path / "emb")
    assert "embedding" not in read_output(tmp_path / "plain").schema.names
    schema = read_output(tmp_path / "emb").schema
    assert schema.field("embedding").type == pa.list_(pa.float32())
    for name in PHOTOS:
        uri = str(photo_dir / name)
        row = emb[uri]
        assert row["status"] == "ok"
        # Same forward pass: the labels and scores do not move.
        assert row["labels"] == plain[uri]["labels"]
        assert row["scores"] == pytest.approx(plain[uri]["scores"], abs=1e-6)
        vector = np.asarray(row["embedding"])
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
        assert _cosine(vector, _reference_embedding(model_dir, kind, photo_dir / name)) >= 0.9999


@pytest.mark.slow
def test_default_model_embeddings_equal_timm_pre_logits(photo_dir: Path, tmp_path: Path) -> None:
    from transforms.model.default_model import default_model_dir

    out = tmp_path / "out"
    names = ("chelsea.jpg", "coffee.jpg")
    assert (
        run_job(
            ["--input", str(_manifest(photo_dir, tmp_path, names)), "--output", str(out)]
            + ["--embeddings"]
        )
        == 0
    )
    rows = _by_uri(out)
    for name in names:
        vector = rows[str(photo_dir / name)]["embedding"]
        assert len(vector) == 1280
        reference = _reference_embedding(default_model_dir(), "timm", photo_dir / name)
        assert _cosine(vector, reference) >= 0.9999


@pytest.mark.slow
def test_embedding_is_null_on_failed_rows_and_survives_quantize(
    tiny_vit: Path, photo_dir: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "in.txt"
    manifest.write_text(f"{photo_dir / 'chelsea.jpg'}\n{tmp_path / 'missing.jpg'}\n")
    out = tmp_path / "out"
    args = ["--input", str(manifest), "--output", str(out), "--model", str(tiny_vit)]
    assert run_job([*args, "--embeddings", "--quantize", "int8"]) == 0
    rows = _by_uri(out)
    assert rows[str(tmp_path / "missing.jpg")]["embedding"] is None
    ok = rows[str(photo_dir / "chelsea.jpg")]
    reference = _reference_embedding(tiny_vit, "vit", photo_dir / "chelsea.jpg")
    # int8 Linear layers move the features a little, never the head's input layer away.
    assert _cosine(ok["embedding"], reference) > 0.99


def test_classify_and_label_images_give_the_job_embedding(
    tiny_vit: Path, photo_dir: Path, tmp_path: Path
) -> None:
    from transforms.api import LabelImages, classify

    path = photo_dir / "coffee.jpg"
    reference = _reference_embedding(tiny_vit, "vit", path)
    result = classify(str(path), model=str(tiny_vit), embeddings=True, top_k=2)
    assert [d["label"] for d in result["labels"]] == [
        d["label"] for d in classify(str(path), model=str(tiny_vit), top_k=2)
    ]
    assert result["embedding"].dtype == np.float32
    assert _cosine(result["embedding"], reference) >= 0.9999

    def cosine(record: dict[str, Any]) -> bool:
        return record["embedding"] is not None and _cosine(record["embedding"], reference) >= 0.9999

    with BeamTestPipeline() as p:
        out = p | beam.Create([str(path)]) | LabelImages(model=str(tiny_vit), embeddings=True)
        assert_that(out | beam.Map(cosine), equal_to([True]))


# ---- --threshold ---------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(
        st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=4, max_size=4),
        min_size=1,
        max_size=5,
    ),
    top_k=st.integers(0, 5),
    threshold=st.floats(0, 1, allow_nan=False),
)
def test_threshold_keeps_labels_at_or_above_it_up_to_top_k(
    scores: list[list[float]], top_k: int, threshold: float
) -> None:
    array = np.asarray(scores, dtype=np.float32)
    id2label = {i: f"l{i}" for i in range(4)}
    for row, prediction in zip(
        array, top_k_predictions(array, id2label, top_k, threshold=threshold), strict=True
    ):
        ranked = sorted(range(4), key=lambda i: (-row[i], i))
        kept = [i for i in ranked if row[i] >= threshold][: top_k or None]
        assert prediction.labels == [id2label[i] for i in kept]
        assert prediction.scores == [float(row[i]) for i in kept]
        assert (prediction.label, prediction.score) == (id2label[ranked[0]], float(row[ranked[0]]))


def _filtered(reference: list[dict[str, Any]], threshold: float, top_k: int) -> list[str]:
    kept = [d["label"] for d in reference if d["score"] >= threshold]
    return kept[:top_k] if top_k else kept


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [0, 2])
def test_threshold_on_a_sigmoid_classifier_equals_transformers_filtered(
    tiny_multilabel: Path, photo_dir: Path, tmp_path: Path, top_k: int
) -> None:
    from transformers import pipeline

    seed = pipeline("image-classification", model=str(tiny_multilabel), device="cpu")
    reference = {n: seed(str(photo_dir / n), top_k=None) for n in PHOTOS}
    all_scores = sorted(d["score"] for r in reference.values() for d in r)
    threshold = round(float(np.median(all_scores)), 4)
    out = tmp_path / "out"
    args = ["--input", str(_manifest(photo_dir, tmp_path)), "--output", str(out)]
    args += ["--model", str(tiny_multilabel), "--threshold", str(threshold), "--top-k", str(top_k)]
    assert run_job(args) == 0
    rows = _by_uri(out)
    sizes = set()
    for name in PHOTOS:
        row, ref = rows[str(photo_dir / name)], reference[name]
        assert row["labels"] == _filtered(ref, threshold, top_k)
        assert all(s >= threshold for s in row["scores"])
        assert (row["label"], row["score"]) == (ref[0]["label"], pytest.approx(ref[0]["score"]))
        sizes.add(len(row["labels"]))
    if top_k == 0:
        assert len(sizes) > 1  # the threshold really splits: not a fixed k


@pytest.mark.slow
def test_threshold_on_siglip_zero_shot_equals_transformers_filtered(
    tiny_siglip: Path, photo_dir: Path, tmp_path: Path
) -> None:
    from transformers import pipeline

    seed = pipeline("zero-shot-image-classification", model=str(tiny_siglip), device="cpu")
    reference = {
        n: seed(str(photo_dir / n), candidate_labels=list(LABELS), top_k=None) for n in PHOTOS
    }
    all_scores = sorted(d["score"] for r in reference.values() for d in r)
    threshold = float(all_scores[len(all_scores) * 2 // 3])
    out = tmp_path / "out"
    args = ["--input", str(_manifest(photo_dir, tmp_path)), "--output", str(out)]
    args += ["--model", str(tiny_siglip), "--candidate-labels", ",".join(LABELS)]
    assert run_job([*args, "--threshold", repr(threshold), "--top-k", "0"]) == 0
    rows = _by_uri(out)
    for name in PHOTOS:
        row = rows[str(photo_dir / name)]
        expected = _filtered(reference[name], threshold, 0)
        # Scores equal to the threshold within float noise may fall either side.
        near = {d["label"] for d in reference[name] if abs(d["score"] - threshold) < 1e-5}
        assert [x for x in row["labels"] if x not in near] == [x for x in expected if x not in near]
        assert row["label"] == reference[name][0]["label"]


def test_threshold_is_a_score_between_0_and_1(
    tiny_vit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--input", str(tmp_path / "x.txt"), "--output", str(tmp_path / "o")]
    assert run_job([*args, "--model", str(tiny_vit), "--threshold", "1.5"]) == EXIT_BAD_CONFIG
    assert "--threshold" in capsys.readouterr().err


# ---- WebDataset tar shards -----------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shards(photo_dir: Path, root: Path, *, gz_last: bool = False) -> list[tuple[str, str]]:
    """Three shards as webdataset's ShardWriter lays them out; (key, photo) per sample."""
    samples = []
    root.mkdir(parents=True, exist_ok=True)
    names = [n for n in sorted(p.name for p in photo_dir.iterdir())]
    per_shard = [names[i::3] for i in range(3)]
    for shard, members in enumerate(per_shard):
        path = root / f"shard-{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, name in enumerate(members):
                key = f"{shard:03d}{i:04d}"
                suffix = "png" if name.endswith(".png") else "jpg"
                _add(tar, f"{key}.{suffix}", (photo_dir / name).read_bytes())
                _add(tar, f"{key}.json", json.dumps({"photo": name, "n": i}).encode())
                _add(tar, f"{key}.txt", f"a photo: {name}".encode())
                _add(tar, f"{key}.cls", str(i).encode())
                samples.append((key, name))
        if gz_last and shard == 2:
            path.with_suffix(".tar.gz").write_bytes(gzip.compress(path.read_bytes()))
    return samples


def test_shards_label_like_the_same_images_from_a_manifest(
    tiny_vit: Path, photo_dir: Path, tmp_path: Path
) -> None:
    samples = _write_shards(photo_dir, tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    common = ["--model", str(tiny_vit), "--top-k", "3", "--embeddings"]
    assert run_job(["--input", pattern, "--output", str(tmp_path / "wds"), *common]) == 0
    names = tuple(name for _, name in samples)
    manifest = _manifest(photo_dir, tmp_path, names)
    assert run_job(["--input", str(manifest), "--output", str(tmp_path / "m"), *common]) == 0
    from_manifest = {Path(u).name: r for u, r in _by_uri(tmp_path / "m").items()}
    table = read_output(tmp_path / "wds")
    assert {"__key__", "__url__", "json", "txt", "cls"} <= set(table.schema.names)
    assert "image" not in table.schema.names
    rows = {r["__key__"]: r for r in table.to_pylist()}
    assert len(rows) == len(samples) == len(list(photo_dir.iterdir()))
    for key, name in samples:
        row, expected = rows[key], from_manifest[name]
        assert row["status"] == "ok", row["error"]
        assert row["labels"] == expected["labels"]
        assert row["scores"] == pytest.approx(expected["scores"], abs=1e-6)
        assert np.allclose(row["embedding"], expected["embedding"], atol=1e-6)
        assert json.loads(row["json"])["photo"] == name
        assert row["txt"] == f"a photo: {name}"
        assert row["__url__"].endswith(f"shard-{int(key[:3]):06d}.tar")
        assert row["source_file"] == row["__url__"]


def test_bad_samples_and_shards_become_rows(
    tiny_vit: Path, photo_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "shards"
    root.mkdir()
    good = (photo_dir / "chelsea.jpg").read_bytes()
    with tarfile.open(root / "a.tar", "w") as tar:
        _add(tar, "s1.jpg", good)
        _add(tar, "s1.txt", b"ok")
        _add(tar, "s2.txt", b"no image here")  # no image member
        _add(tar, "s3.jpg", b"not a jpeg at all")  # undecodable
        _add(tar, "s4.json", b"{}")
        _add(tar, "s4.webp", _webp(photo_dir / "coffee.jpg"))
        _add(tar, "__index__", b"meta")  # skipped, as webdataset does
    # A truncated shard: its first sample is read, the rest is one bad_shard row.
    with tarfile.open(root / "b.tar", "w") as tar:
        _add(tar, "t1.jpg", good)
        _add(tar, "t2.jpg", good)
    data = (root / "b.tar").read_bytes()
    (root / "b.tar").write_bytes(data[: 512 + len(good) + 512 + 100])
    out = tmp_path / "out"
    args = ["--input", str(root / "*.tar"), "--output", str(out), "--model", str(tiny_vit)]
    assert run_job([*args, "--keep-image-column"]) == 0
    rows = read_output(out).to_pylist()
    by = {(Path(r["__url__"]).name, r["__key__"]): r for r in rows}
    assert len(rows) == 6
    assert by[("a.tar", "s1")]["status"] == "ok"
    assert by[("a.tar", "s1")]["image"] == good  # --keep-image-column keeps the member
    assert by[("a.tar", "s2")]["error"].startswith("no_image:")
    assert by[("a.tar", "s3")]["status"] == "decode_error"
    assert by[("a.tar", "s4")]["status"] == "ok" and by[("a.tar", "s4")]["json"] == "{}"
    assert by[("b.tar", "t1")]["status"] == "ok"
    bad = by[("b.tar", None)]
    assert bad["status"] == "decode_error" and bad["error"].startswith("bad_shard:")
    assert bad["source_row"] == 1


def _webp(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, "WEBP")
    return buffer.getvalue()


@pytest.mark.slow
def test_gzipped_shards_over_http_stream(tiny_vit: Path, photo_dir: Path, tmp_path: Path) -> None:
    """A gzip shard served over loopback http, read as a stream."""
    import functools
    import http.server
    import threading

    _write_shards(photo_dir, tmp_path / "shards", gz_last=True)
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "shards")
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/shard-000002.tar.gz"
        out = tmp_path / "out"
        assert run_job(["--input", url, "--output", str(out), "--model", str(tiny_vit)]) == 0
    finally:
        server.shutdown()
    rows = read_output(out).to_pylist()
    assert rows and all(r["status"] == "ok" for r in rows)
    assert {r["__url__"] for r in rows} == {url}


def test_shard_patterns_and_member_names(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"s-{i:06d}.tar").write_bytes(b"")
    pattern = str(tmp_path / "s-{000000..000002}.tar")
    assert [Path(p).name for p in match_files(pattern)] == [f"s-{i:06d}.tar" for i in range(3)]
    from transforms.images.sources import InputError

    with pytest.raises(InputError, match="s-000003.tar does not exist"):
        match_files(str(tmp_path / "s-{000000..000003}.tar"))
    # webdataset's base_plus_ext: key up to the first dot of the file name.
    assert split_name("dir.v1/000123.seg.png") == ("dir.v1/000123", "seg.png")
    assert split_name("000123.JPG") == ("000123", "JPG")
    assert split_name("__index__") is None and split_name("a/.hidden.jpg") is None
