"""uint8 pixels from the decode workers, rescaled and normalized in the handler."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import classifier_handler, real_photo
from transforms.model.image_classification import ImageClassificationModelHandler
from transforms.model.loading import ModelSpec
from transforms.model.pixels import TOLERANCE, checked_split, full_output
from transforms.model.preprocess import ImagePreprocessor


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photos at the sizes datasets hold (500x375 landscape, 375x500 portrait)."""
    return [
        real_photo("chelsea").resize((500, 375)),
        real_photo("astronaut").resize((375, 500)),
        real_photo("coffee").resize((500, 333)),
    ]


def _processors() -> dict[str, Any]:
    from transformers import (
        CLIPImageProcessor,
        ConvNextImageProcessor,
        MobileNetV2ImageProcessor,
        SiglipImageProcessor,
        ViTImageProcessor,
    )

    return {
        "vit": ViTImageProcessor(),
        "convnext-224": ConvNextImageProcessor(size={"shortest_edge": 224}),
        "convnext-384": ConvNextImageProcessor(size={"shortest_edge": 384}),
        "clip": CLIPImageProcessor(),
        "siglip": SiglipImageProcessor(),
        "mobilenet_v2": MobileNetV2ImageProcessor(),
    }


@pytest.mark.parametrize("name", sorted(_processors()))
def test_the_split_gives_the_processors_own_pixels(name: str, photos: list[Image.Image]) -> None:
    processor = _processors()[name]
    split = checked_split(processor)
    assert split is not None
    pixels = split.resize_crop(photos)
    assert all(p.dtype == np.uint8 for p in pixels)
    ours = split.normalization.apply(torch.from_numpy(np.stack(pixels)))
    theirs = torch.from_numpy(np.stack(full_output(processor, photos)))
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().max()) <= TOLERANCE
    # A quarter of the bytes cross from the decode workers to the model.
    assert sum(p.nbytes for p in pixels) == theirs.numel()  # a byte a value, not four


@pytest.mark.parametrize("name", sorted(_processors()))
def test_the_direct_resize_gives_the_processors_own_uint8_pixels(
    name: str, photos: list[Image.Image]
) -> None:
    processor = _processors()[name]
    split = checked_split(processor)
    assert split is not None and split.direct  # torchvision-backed: resized without the call
    rng = np.random.default_rng(1)
    odd = [  # smaller than the crop (padded), a strip, a grey photo made RGB
        Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (40, 900, 3), dtype=np.uint8)),
        photos[0].convert("L").convert("RGB"),
    ]
    for image in [*photos, *odd]:
        (ours,) = split.resize_crop([image])
        theirs = processor(
            images=[image], do_rescale=False, do_normalize=False, return_tensors="pt"
        )["pixel_values"][0].numpy()
        assert ours.flags.c_contiguous and ours.dtype == np.uint8
        assert np.array_equal(ours, theirs), image.size


def test_a_direct_resize_that_differs_is_not_used(photos: list[Image.Image]) -> None:
    from transformers import ViTImageProcessor

    class Flipped(ViTImageProcessor):  # its own call gives what its _preprocess does not
        def preprocess(self, images: Any, **kwargs: Any) -> Any:
            out = super().preprocess(images, **kwargs)
            out["pixel_values"] = out["pixel_values"].flip(-1)
            return out

    split = checked_split(Flipped())
    assert split is not None and not split.direct
    theirs = Flipped()(images=photos, do_rescale=False, do_normalize=False, return_tensors="pt")
    assert np.array_equal(np.stack(split.resize_crop(photos)), theirs["pixel_values"].numpy())


def test_the_default_models_timm_processor_splits(photos: list[Image.Image]) -> None:
    pre = ImagePreprocessor(ModelSpec())
    pixels = pre(photos)
    assert pre.normalization is not None and pixels[0].dtype == np.uint8
    ours = pre.normalization.apply(torch.from_numpy(np.stack(pixels)))
    theirs = torch.from_numpy(np.stack(pre.pixel_values(photos)))
    assert float((ours - theirs).abs().max()) <= TOLERANCE


def test_a_processor_the_split_cannot_express_keeps_its_float_output(
    photos: list[Image.Image], caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import EfficientNetImageProcessor, ViTImageProcessor

    # EfficientNet's rescale offset is not a plain rescale and normalize.
    assert checked_split(EfficientNetImageProcessor(rescale_offset=True)) is None

    class Shifted(ViTImageProcessor):  # an output the split would not reproduce
        def preprocess(self, images: Any, **kwargs: Any) -> Any:
            out = super().preprocess(images, **kwargs)
            if kwargs.get("do_normalize", True):
                out["pixel_values"] = out["pixel_values"] + 1e-3
            return out

    with caplog.at_level(logging.WARNING, logger="transforms.model.pixels"):
        assert checked_split(Shifted()) is None
        assert checked_split(Shifted()) is None
    warnings = [r for r in caplog.records if "differs from its own output" in r.message]
    assert len(warnings) == 1  # logged once


def test_uint8_batches_give_the_float_batches_logits(
    tiny_vit: Path, tiny_resnet: Path, photos: list[Image.Image]
) -> None:
    for model_dir in (tiny_vit, tiny_resnet):
        loaded = classifier_handler(model_dir).load_model()
        assert loaded.normalization is not None
        pre = ImagePreprocessor(ModelSpec(str(model_dir)))
        uint8 = ImageClassificationModelHandler.forward(pre(photos), loaded)
        floats = ImageClassificationModelHandler.forward(pre.pixel_values(photos), loaded)
        assert np.array_equal(uint8, floats)
