"""Images as bytes or PIL: embedded-image Parquet, `LabelImages` and `classify`."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from tests.conftest import read_output, real_photo, run_job
from transforms import LabelImages, classify

pytestmark = pytest.mark.slow


def _jpeg(name: str, size: int = 96) -> bytes:
    image = real_photo(name)
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ---- Parquet with the images inside -------------------------------------------------


def _hf_image_table(photo_dir: Path) -> pa.Table:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [
        {"bytes": _jpeg("chelsea"), "path": "chelsea.jpg"},
        {"bytes": None, "path": str(photo_dir / "coffee.png")},  # fetched, as datasets does
        {"bytes": None, "path": None},
        None,
        {"bytes": b"not an image", "path": None},
        {"bytes": _jpeg("rocket"), "path": None},
    ]
    return pa.table(
        {
            "id": pa.array([1, 2, 3, 4, 5, 6], pa.int64()),
            "image": pa.array(images, image_type),
            "caption": ["cat", "coffee", None, "nothing", "junk", "rocket"],
            "tags": pa.array([["a"], [], None, ["b"], [], ["c", "d"]], pa.list_(pa.string())),
        }
    )


def test_datasets_image_layout(tiny_vit: Path, photo_dir: Path, tmp_path: Path) -> None:
    source = _hf_image_table(photo_dir)
    src = tmp_path / "images.parquet"
    pq.write_table(source, src, row_group_size=4)
    out = tmp_path / "out"
    # No --uri-column or --image-column: the struct column is detected.
    assert run_job(["--input", str(src), "--output", str(out), "--model", str(tiny_vit)]) == 0
    table = read_output(out)
    assert "image" not in table.schema.names  # image bytes are not copied by default
    # The struct's path stays, as a column of its own, for joining back.
    assert table.schema.names[:4] == ["id", "image_path", "caption", "tags"]
    assert table.schema.field("tags").type == pa.list_(pa.string())
    rows = {r["id"]: r for r in table.to_pylist()}
    assert [rows[i]["status"] for i in range(1, 7)] == [
        "ok",
        "ok",
        "invalid_input",
        "invalid_input",
        "decode_error",
        "ok",
    ]
    assert rows[3]["error"].startswith("empty_uri")
    assert rows[5]["error"].startswith("not_an_image")
    assert [rows[i]["image_path"] for i in range(1, 7)] == [
        "chelsea.jpg",
        str(photo_dir / "coffee.png"),
        None,
        None,
        None,
        None,
    ]
    assert {rows[i]["source_row"] for i in range(1, 7)} == set(range(6))
    assert {rows[i]["source_file"] for i in range(1, 7)} == {str(src)}
    for original in source.drop_columns(["image"]).to_pylist():
        for key, value in original.items():
            assert rows[original["id"]][key] == value


def test_keep_image_column(tiny_vit: Path, photo_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "images.parquet"
    pq.write_table(_hf_image_table(photo_dir), src)
    out = tmp_path / "out"
    args = [
        "--input",
        str(src),
        "--output",
        str(out),
        "--model",
        str(tiny_vit),
        "--image-column",
        "image",
        "--keep-image-column",
    ]
    assert run_job(args) == 0
    table = read_output(out)
    assert table.schema.field("image").type == _hf_image_table(photo_dir).schema.field("image").type
    assert {r["id"]: r["image"] for r in table.to_pylist()}[1]["bytes"] == _jpeg("chelsea")


def test_plain_binary_column(tiny_vit: Path, tmp_path: Path) -> None:
    source = pa.table(
        {
            "key": ["a", "b", "c"],
            "jpg": pa.array([_jpeg("coffee"), b"", _jpeg("astronaut")], pa.binary()),
            "score_in": pa.array([0.5, None, 1.5], pa.float32()),
        }
    )
    src = tmp_path / "binary.parquet"
    pq.write_table(source, src)
    out = tmp_path / "out"
    assert run_job(["--input", str(src), "--output", str(out), "--model", str(tiny_vit)]) == 0
    table = read_output(out)
    assert "jpg" not in table.schema.names
    assert table.schema.field("score_in").type == pa.float32()
    rows = {r["key"]: r for r in table.to_pylist()}
    assert (rows["a"]["status"], rows["b"]["status"], rows["c"]["status"]) == (
        "ok",
        "decode_error",
        "ok",
    )
    assert rows["b"]["error"].startswith("empty_file")


def test_image_column_errors(
    tiny_vit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"uri": ["a.jpg"], "n": [1]}), src)
    args = ["--input", str(src), "--output", str(tmp_path / "o"), "--model", str(tiny_vit)]
    assert run_job(args + ["--image-column", "n"]) == 2
    assert "expected binary" in capsys.readouterr().err


def test_big_row_groups_are_read_in_bounded_batches() -> None:
    from transforms.images.sources.tables import parquet_batch_rows

    class Group:
        num_rows = 10_000
        total_byte_size = 10_000 * 2_000_000  # 2 MB images

    assert parquet_batch_rows(Group()) == 16  # 32 MiB per batch


# ---- LabelImages in a user's pipeline --------------------------------------------------


def test_label_images_accepts_every_element_kind(tiny_vit: Path, photo_dir: Path) -> None:
    cat_path = str(photo_dir / "chelsea.jpg")
    pil = Image.open(photo_dir / "coffee.png")
    pil.load()
    elements: list[Any] = [
        cat_path,
        _jpeg("rocket"),
        pil,
        {"id": 1, "uri": cat_path},
        {"id": 2, "image": _jpeg("astronaut")},
        {"id": 3, "image": {"bytes": None, "path": cat_path}},
        beam.Row(id=4, uri=cat_path),
        ("key-5", {"id": 5, "uri": cat_path}),
        ("key-6", _jpeg("coffee")),
        # Bad elements are rows too.
        12345,
        {"id": 7},
        {"id": 8, "image": b"garbage"},
        {"id": 9, "uri": "/nope.jpg"},
        {"id": 10, "image": 3.5},
    ]

    def summarize(item: Any) -> tuple[Any, ...]:
        key, record = item if isinstance(item, tuple) else (None, item)
        code = (record["error"] or "").split(":")[0] or None
        return (
            key,
            record.get("id"),
            record.get("uri"),
            record["status"],
            code,
            len(record["labels"] or []),
        )

    with BeamTestPipeline() as p:
        out = p | beam.Create(elements) | LabelImages(model=str(tiny_vit), top_k=2)
        assert_that(
            out | beam.Map(summarize),
            equal_to(
                [
                    (None, None, cat_path, "ok", None, 2),
                    (None, None, None, "ok", None, 2),
                    (None, None, None, "ok", None, 2),
                    (None, 1, cat_path, "ok", None, 2),
                    (None, 2, None, "ok", None, 2),
                    (None, 3, None, "ok", None, 2),
                    (None, 4, cat_path, "ok", None, 2),
                    ("key-5", 5, cat_path, "ok", None, 2),
                    ("key-6", None, None, "ok", None, 2),
                    (None, None, None, "invalid_input", "unsupported_element", 0),
                    (None, 7, None, "invalid_input", "empty_uri", 0),
                    (None, 8, None, "decode_error", "not_an_image", 0),
                    (None, 9, "/nope.jpg", "fetch_error", "not_found", 0),
                    (None, 10, None, "invalid_input", "unsupported_element", 0),
                ]
            ),
        )


def test_label_images_output_drops_image_bytes(tiny_vit: Path) -> None:
    with BeamTestPipeline() as p:
        out = (
            p
            | beam.Create([{"id": 1, "image": _jpeg("coffee")}])
            | LabelImages(model=str(tiny_vit))
        )
        assert_that(
            out | beam.Map(lambda r: sorted(r)),
            equal_to([sorted(["id", "label", "score", "labels", "scores", "status", "error"])]),
        )


def test_label_images_zero_shot(tiny_clip: Path, photo_dir: Path) -> None:
    with BeamTestPipeline() as p:
        out = (
            p
            | beam.Create([str(photo_dir / "chelsea.jpg")])
            | LabelImages(
                model=str(tiny_clip),
                task="zero-shot-image-classification",
                candidate_labels=["cat", "dog", "car"],
                top_k=0,
            )
        )
        assert_that(
            out | beam.Map(lambda r: sorted(r["labels"])), equal_to([["car", "cat", "dog"]])
        )


def test_label_images_validates_options_at_construction(tiny_vit: Path) -> None:
    with pytest.raises(TypeError, match="topk"):
        LabelImages(model=str(tiny_vit), topk=3)
    with pytest.raises(TypeError):
        LabelImages(str(tiny_vit))  # keyword-only
    with pytest.raises(ValueError, match="top_k"):
        LabelImages(model=str(tiny_vit), top_k=-1)
    with pytest.raises(ValueError, match="task"):
        LabelImages(model=str(tiny_vit), task="detection")
    with pytest.raises(ValueError, match="candidate"):
        LabelImages(model=str(tiny_vit), task="zero-shot-image-classification")
    with pytest.raises(ValueError, match="duplicate"):
        LabelImages(
            model=str(tiny_vit), task="zero-shot-image-classification", candidate_labels=["a", "a"]
        )


# ---- classify: in memory, the seed's style ------------------------------------------


def test_classify_equals_the_pipeline_output(
    tiny_vit: Path, photo_dir: Path, tmp_path: Path
) -> None:
    names = ["chelsea.jpg", "coffee.png", "rocket.jpg", "camera_gray.png"]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(names) + "\n")
    for name in names:
        (tmp_path / name).write_bytes((photo_dir / name).read_bytes())
    out = tmp_path / "out"
    assert (
        run_job(
            [
                "--input",
                str(manifest),
                "--output",
                str(out),
                "--model",
                str(tiny_vit),
                "--top-k",
                "3",
            ]
        )
        == 0
    )
    written = {r["uri"]: r for r in read_output(out).to_pylist()}
    paths = [str(tmp_path / n) for n in names]
    by_path = classify(paths, model=str(tiny_vit), top_k=3)
    by_bytes = classify([Path(p).read_bytes() for p in paths], model=str(tiny_vit), top_k=3)
    for name, from_path, from_bytes in zip(names, by_path, by_bytes, strict=True):
        assert isinstance(from_path, list) and isinstance(from_bytes, list)
        assert [d["label"] for d in from_path] == written[name]["labels"]
        assert [d["score"] for d in from_path] == pytest.approx(written[name]["scores"], abs=1e-6)
        assert [d["label"] for d in from_bytes] == [d["label"] for d in from_path]
        assert [d["score"] for d in from_bytes] == pytest.approx(
            [d["score"] for d in from_path], abs=1e-6
        )
    single = classify(paths[0], model=str(tiny_vit), top_k=3)
    assert isinstance(single, list) and isinstance(single[0], dict)
    assert [d["label"] for d in single] == written[names[0]]["labels"]


def test_classify_pil_images_match_the_seed(tiny_vit: Path) -> None:
    from transformers import pipeline

    images = [real_photo("chelsea"), real_photo("coffee")]
    for image in images:
        image.thumbnail((120, 120))
    seed = pipeline("image-classification", model=str(tiny_vit), device="cpu")(images, top_k=4)
    ours = classify(images, model=str(tiny_vit), top_k=4)
    for mine, theirs in zip(ours, seed, strict=True):
        assert isinstance(mine, list)
        assert [d["label"] for d in mine] == [d["label"] for d in theirs]
        assert [d["score"] for d in mine] == pytest.approx([d["score"] for d in theirs], abs=1e-4)


def test_classify_raises_with_the_error_code(tiny_vit: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^not_found: "):
        classify(str(tmp_path / "missing.jpg"), model=str(tiny_vit))
    with pytest.raises(ValueError, match="^not_an_image: "):
        classify(b"<html></html>", model=str(tiny_vit))
