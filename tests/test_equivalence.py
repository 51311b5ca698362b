"""Tier 3: tiny real models, checked against `transformers.pipeline`.

Same model, same images (paths and PIL images): the top-k labels must be equal
and the scores agree within 1e-4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import classifier_handler, default_fetch, real_thumbnails
from transforms.images.decode import decode_image
from transforms.images.fetch import fetch_bytes
from transforms.model.loading import ModelSpec
from transforms.model.preprocess import ImagePreprocessor
from transforms.rows import Prediction

TOL = 1e-4


def _seed(model_dir: Path, images: list[Any], **kwargs: Any) -> list[list[dict[str, Any]]]:
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(model_dir), device="cpu")
    out = pipe(images, **kwargs)
    return out if isinstance(out[0], list) else [out]


def _ours(model_dir: Path, images: list[Image.Image], **kwargs: Any) -> list[Prediction]:
    spec = ModelSpec(str(model_dir))
    handler = classifier_handler(model_dir, **kwargs)
    model = handler.load_model()
    pixel_values = ImagePreprocessor(spec)(images)
    results = list(handler.run_inference(pixel_values, model))
    assert all(isinstance(r, Prediction) for r in results)
    return results


def _assert_same(ours: list[Prediction], seed: list[list[dict[str, Any]]]) -> None:
    assert len(ours) == len(seed)
    for mine, theirs in zip(ours, seed, strict=True):
        assert mine.labels == [d["label"] for d in theirs]
        assert mine.scores == pytest.approx([d["score"] for d in theirs], abs=TOL)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return real_thumbnails(120)


@pytest.mark.parametrize("function_to_apply", ["default", "softmax", "sigmoid", "none"])
@pytest.mark.parametrize("model_name", ["tiny_vit", "tiny_multilabel"])
def test_pil_images_match_the_seed(
    request: pytest.FixtureRequest,
    photos: list[Image.Image],
    model_name: str,
    function_to_apply: str,
) -> None:
    model_dir = request.getfixturevalue(model_name)
    seed_kwargs: dict[str, Any] = {"top_k": 3}
    if function_to_apply != "default":
        seed_kwargs["function_to_apply"] = function_to_apply
    ours = _ours(model_dir, photos, top_k=3, function_to_apply=function_to_apply)
    _assert_same(ours, _seed(model_dir, photos, **seed_kwargs))


@pytest.mark.parametrize("model_name", ["tiny_vit", "tiny_multilabel"])
def test_default_function_follows_the_model_config(
    request: pytest.FixtureRequest, photos: list[Image.Image], model_name: str
) -> None:
    """Single-label models get softmax (scores sum to 1), multi-label ones sigmoid."""
    model_dir = request.getfixturevalue(model_name)
    (ours,) = _ours(model_dir, photos[:1], top_k=0)
    total = sum(ours.scores)
    if model_name == "tiny_vit":
        assert total == pytest.approx(1.0, abs=1e-5)
    else:
        assert total != pytest.approx(1.0, abs=1e-3)
        assert all(0.0 < s < 1.0 for s in ours.scores)


def test_top_k_larger_than_num_labels_is_capped(tiny_vit: Path, photos: list[Image.Image]) -> None:
    ours = _ours(tiny_vit, photos, top_k=50)
    assert all(len(p.labels) == 7 for p in ours)
    _assert_same(ours, _seed(tiny_vit, photos, top_k=50))


def test_default_top_k_is_five(tiny_vit: Path, photos: list[Image.Image]) -> None:
    ours = _ours(tiny_vit, photos)
    assert all(len(p.labels) == 5 for p in ours)
    _assert_same(ours, _seed(tiny_vit, photos))


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_paths_match_the_seed(tiny_vit: Path, photo_dir: Path, suffix: str) -> None:
    """Local paths go through our fetch and decode (draft mode off, as in the seed)."""
    paths = sorted(str(p) for p in photo_dir.glob(f"*.{suffix}"))
    images = [decode_image(fetch_bytes(p, default_fetch())) for p in paths]
    ours = _ours(tiny_vit, images, top_k=4)
    _assert_same(ours, _seed(tiny_vit, paths, top_k=4))


def test_gray_and_rgba_paths_match_the_seed(tiny_multilabel: Path, photo_dir: Path) -> None:
    paths = [str(photo_dir / "camera_gray.png"), str(photo_dir / "coffee_rgba.png")]
    images = [decode_image(fetch_bytes(p, default_fetch())) for p in paths]
    _assert_same(_ours(tiny_multilabel, images, top_k=5), _seed(tiny_multilabel, paths, top_k=5))
