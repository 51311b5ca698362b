"""Zero-shot classification: label sets, equivalence with the seed, the label bank."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from tests.conftest import real_thumbnails, zero_shot_handler
from transforms.label import LabelImageRows
from transforms.model.label_set import LabelSet, LabelSetError
from transforms.model.loading import ModelSpec
from transforms.model.preprocess import ImagePreprocessor
from transforms.rows import ImageRow, Prediction

LABELS = ("cat", "dog", "car", "coffee cup", "rocket", "astronaut")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return real_thumbnails(100)


def _ours(model_dir: Path, images: list[Image.Image], label_set: LabelSet, top_k: int) -> list:
    spec = ModelSpec(str(model_dir))
    handler = zero_shot_handler(model_dir, label_set.labels, label_set.templates, top_k=top_k)
    loaded = handler.load_model()
    return list(handler.run_inference(ImagePreprocessor(spec)(images), loaded))


# ---- label sets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "templates", "message"),
    [
        ((), ("{}",), "needs candidate labels"),
        (("cat", " ", "dog"), ("{}",), r"position\(s\) \[1\]"),
        (("cat", "dog", "cat", "dog", "car"), ("{}",), r"\['cat', 'dog'\]"),
        (("cat",), ("a photo of a cat",), "has no '{}'"),
        (("cat",), (), "at least one"),
    ],
)
def test_label_set_errors(
    labels: tuple[str, ...], templates: tuple[str, ...], message: str
) -> None:
    with pytest.raises(LabelSetError, match=message):
        LabelSet(labels, templates)


def test_label_set_digest_changes_with_labels_and_templates() -> None:
    a = LabelSet(("cat", "dog"))
    assert a.digest() == LabelSet(("cat", "dog")).digest()
    assert a.digest() != LabelSet(("dog", "cat")).digest()
    assert a.digest() != LabelSet(("cat", "dog"), ("a {}",)).digest()


# ---- equivalence with transformers' pipeline ------------------------------------


@pytest.mark.parametrize("model_name", ["tiny_clip", "tiny_siglip"])
@pytest.mark.parametrize("template", [None, "a blurry picture of the {}, maybe."])
def test_scores_match_the_seed(
    request: pytest.FixtureRequest,
    photos: list[Image.Image],
    model_name: str,
    template: str | None,
) -> None:
    from transformers import pipeline

    model_dir = request.getfixturevalue(model_name)
    seed = pipeline("zero-shot-image-classification", model=str(model_dir), device="cpu")
    kwargs: dict[str, Any] = {"candidate_labels": list(LABELS)}
    if template:
        kwargs["hypothesis_template"] = template
    label_set = LabelSet(LABELS, (template,) if template else LabelSet(LABELS).templates)
    ours = _ours(model_dir, photos, label_set, top_k=0)
    for image, mine in zip(photos, ours, strict=True):
        expected = seed(image, **kwargs)
        assert isinstance(mine, Prediction)
        assert mine.labels == [e["label"] for e in expected]
        assert mine.scores == pytest.approx([e["score"] for e in expected], abs=1e-4)
    # The random models must still tell the images apart, or the test proves little.
    assert len({tuple(p.labels) for p in ours}) > 1


def test_top_k_defaults_to_five_and_caps(tiny_clip: Path, photos: list[Image.Image]) -> None:
    assert all(len(p.labels) == 5 for p in _ours(tiny_clip, photos, LabelSet(LABELS), top_k=5))
    assert all(len(p.labels) == 6 for p in _ours(tiny_clip, photos, LabelSet(LABELS), top_k=50))


def test_prompt_ensembling_averages_normalized_text_embeddings(tiny_clip: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    templates = ("a photo of a {}.", "a drawing of a {}.")
    handler = zero_shot_handler(tiny_clip, LABELS, templates)
    bank = handler.load_model().text_bank
    model = AutoModel.from_pretrained(tiny_clip).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip)
    per_template = []
    with torch.no_grad():
        for template in templates:
            tokens = tokenizer(
                [template.format(x) for x in LABELS], padding=True, return_tensors="pt"
            )
            out = model.get_text_features(**tokens)
            emb = getattr(out, "pooler_output", out)
            per_template.append(emb / emb.norm(dim=-1, keepdim=True))
    mean = torch.stack(per_template).mean(0)
    expected = mean / mean.norm(dim=-1, keepdim=True)
    assert torch.allclose(bank, expected, atol=1e-5)


# ---- the label bank is computed once per model load ------------------------------


def _counting(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[int]:
    calls: list[int] = []
    original: Callable[..., Any] = getattr(cls, name)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)
    return calls


def test_text_tower_runs_once_per_load_not_per_batch(
    tiny_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import CLIPModel

    text_calls = _counting(monkeypatch, CLIPModel, "get_text_features")
    image_calls = _counting(monkeypatch, CLIPModel, "get_image_features")
    rows = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        Image.fromarray(
            np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        ).save(path)
        rows.append(ImageRow(index=f"0:{i}", uri=str(path), values={"n": i}))
    spec = ModelSpec(str(tiny_clip))
    handler = zero_shot_handler(tiny_clip, LABELS, top_k=2, batch_size=2)
    with BeamTestPipeline() as p:
        records = p | beam.Create(rows) | LabelImageRows(handler, ImagePreprocessor(spec))
        assert_that(
            records | beam.Map(lambda r: (r["status"], len(r["labels"]))),
            equal_to([("ok", 2)] * 8),
        )
    assert len(image_calls) >= 4  # eight images in batches of at most two
    assert len(text_calls) == 1  # six prompts: one text-tower pass, at load time


def test_ten_thousand_labels_are_encoded_in_bounded_batches(
    tiny_clip: Path, photos: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import CLIPModel

    text_calls = _counting(monkeypatch, CLIPModel, "get_text_features")
    labels = tuple(f"thing {i}" for i in range(10_000))
    spec = ModelSpec(str(tiny_clip))
    handler = zero_shot_handler(tiny_clip, labels, top_k=3, text_batch_size=1000)
    loaded = handler.load_model()
    assert tuple(loaded.text_bank.shape) == (10_000, 16)
    assert len(text_calls) == 10  # 10,000 prompts in passes of 1,000
    results = list(handler.run_inference(ImagePreprocessor(spec)(photos), loaded))
    predictions = [r for r in results if isinstance(r, Prediction)]
    assert len(predictions) == len(photos)
    assert all(len(p.labels) == 3 and set(p.labels) <= set(labels) for p in predictions)


# ---- the CLI ------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_zero_shot_with_a_label_file(
    tiny_siglip: Path, photo_dir: Path, tmp_path: Path
) -> None:
    from pipelines.label_images import EXIT_OK, run

    manifest = tmp_path / "list.txt"
    manifest.write_text("chelsea.jpg\ncoffee.png\nmissing.jpg\n")
    for name in ("chelsea.jpg", "coffee.png"):
        (tmp_path / name).write_bytes((photo_dir / name).read_bytes())
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n\ndog\ncoffee cup\nrocket\n")
    out = tmp_path / "out"
    code = run(
        [
            "--input",
            str(manifest),
            "--output",
            str(out),
            "--task",
            "zero-shot-image-classification",
            "--model",
            str(tiny_siglip),
            "--candidate-labels-file",
            str(labels),
            "--hypothesis-template",
            "a photo of {}.",
            "--hypothesis-template",
            "a picture of {}.",
            "--top-k",
            "0",
            "--progress",
            "false",
        ],
        save_main_session=False,
    )
    assert code == EXIT_OK
    files = sorted(out.glob("part-*.parquet"))
    table = pq.ParquetDataset([str(f) for f in files]).read()
    rows = {r["uri"]: r for r in table.to_pylist()}
    assert rows["missing.jpg"]["status"] == "fetch_error"
    for name in ("chelsea.jpg", "coffee.png"):
        assert rows[name]["status"] == "ok"
        assert sorted(rows[name]["labels"]) == ["cat", "coffee cup", "dog", "rocket"]
        assert all(0.0 < s < 1.0 for s in rows[name]["scores"])  # SigLIP: sigmoid
    meta = {k.decode(): v.decode() for k, v in (pq.read_schema(files[0]).metadata or {}).items()}
    assert meta["image_labeler.task"] == "zero-shot-image-classification"
    assert meta["image_labeler.label_count"] == "4"
    assert (
        meta["image_labeler.label_set_sha256"]
        == LabelSet(
            ("cat", "dog", "coffee cup", "rocket"), ("a photo of {}.", "a picture of {}.")
        ).digest()
    )
    assert json.loads(meta["image_labeler.hypothesis_templates"]) == [
        "a photo of {}.",
        "a picture of {}.",
    ]
    assert meta["image_labeler.function_to_apply"] == "sigmoid"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "needs --candidate-labels"),
        (["--candidate-labels", "cat,,dog"], "are empty"),
        (["--candidate-labels", "cat,dog,cat"], "duplicate candidate label(s): ['cat']"),
        (["--candidate-labels", "cat,dog", "--hypothesis-template", "a photo"], "has no '{}'"),
        (["--candidate-labels", "cat", "--function-to-apply", "softmax"], "does not apply"),
    ],
)
def test_cli_zero_shot_errors(
    tiny_clip: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    from pipelines.label_images import EXIT_BAD_CONFIG, run

    manifest = tmp_path / "list.txt"
    manifest.write_text("a.jpg\n")
    args = [
        "--input",
        str(manifest),
        "--output",
        str(tmp_path / "out"),
        "--task",
        "zero-shot-image-classification",
        "--model",
        str(tiny_clip),
    ]
    assert run(args + extra, save_main_session=False) == EXIT_BAD_CONFIG
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_zero_shot_refuses_a_model_without_towers(
    tiny_vit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.label_images import EXIT_BAD_CONFIG, run

    manifest = tmp_path / "list.txt"
    manifest.write_text("a.jpg\n")
    args = [
        "--input",
        str(manifest),
        "--output",
        str(tmp_path / "out"),
        "--task",
        "zero-shot-image-classification",
        "--model",
        str(tiny_vit),
        "--candidate-labels",
        "cat,dog",
    ]
    assert run(args, save_main_session=False) == EXIT_BAD_CONFIG
    assert "has no image/text towers" in capsys.readouterr().err


def test_chunked_length_sorted_bank_equals_one_pass(tiny_clip: Path) -> None:
    """Sorting prompts by length and encoding in small chunks changes nothing."""
    import torch

    labels = ("a", "very long label with many words in it", "dog", "red car", "x y z w")
    one_pass = zero_shot_handler(tiny_clip, labels, text_batch_size=100).load_model()
    chunked = zero_shot_handler(tiny_clip, labels, text_batch_size=2).load_model()
    assert torch.allclose(one_pass.text_bank, chunked.text_bank, atol=1e-5)
