"""Batch norms folded into convolutions: same outputs, fewer passes, never a wrong fold.

Folding is on by default for fp32 CNNs, so a bad pairing would change every
score the job writes; each refusal case below must leave the model untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import classifier_handler, randomize_batchnorms, real_thumbnails
from transforms.model.image_classification import ImageClassificationModelHandler, example_input
from transforms.model.loading import ModelSpec
from transforms.model.preprocess import ImagePreprocessor
from transforms.model.speedups.batchnorm import fold_batchnorm


def _randomize_stats(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    return randomize_batchnorms(model, weight=(0.5, 1.5), bias=(-0.5, 0.5)).eval()


class ConvBn(torch.nn.Module):
    """conv -> bn -> relu, plus optionally a branch that reuses the conv's output."""

    def __init__(self, reuse_conv_output: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 4)
        self.reuse = reuse_conv_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = torch.relu(self.bn(y))
        if self.reuse:  # a residual taken before the norm: folding would change it
            z = z + y
        return self.head(z.mean(dim=(2, 3)))


class NormFirst(torch.nn.Module):
    """A batch norm on the input, not after a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x)).mean(dim=(2, 3))


def _fold(model: torch.nn.Module) -> tuple[int, torch.Tensor, torch.Tensor]:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    folded = fold_batchnorm(model, model, x[:1])
    with torch.no_grad():
        after = model(x)
    return folded, before, after


def _norms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_a_conv_then_batchnorm_is_folded_exactly() -> None:
    model = _randomize_stats(ConvBn())
    folded, before, after = _fold(model)
    assert folded == 1
    assert _norms(model) == 0
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-6)


def test_a_conv_output_used_twice_is_not_folded(caplog: pytest.LogCaptureFixture) -> None:
    model = _randomize_stats(ConvBn(reuse_conv_output=True))
    conv = model.conv
    with caplog.at_level(logging.WARNING):
        folded, before, after = _fold(model)
    assert folded == 0
    assert "Not folding batch norms" in caplog.text  # the check undid it, not the tracing
    assert model.conv is conv and isinstance(model.bn, torch.nn.BatchNorm2d)
    assert torch.equal(after, before)


def test_a_batchnorm_on_the_input_is_left_alone() -> None:
    model = _randomize_stats(NormFirst())
    folded, before, after = _fold(model)
    assert folded == 0 and _norms(model) == 1
    assert torch.equal(after, before)


def test_a_model_that_fails_on_the_example_is_left_alone() -> None:
    class NeedsLargeInput(ConvBn):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] < 32:
                raise ValueError("input too small")
            return super().forward(x)

    model = _randomize_stats(NeedsLargeInput())
    assert fold_batchnorm(model, model, torch.rand(1, 3, 16, 16)) == 0
    assert _norms(model) == 1


def test_a_failure_while_checking_restores_the_model(caplog: pytest.LogCaptureFixture) -> None:
    model = _randomize_stats(ConvBn())
    conv, bn = model.conv, model.bn
    calls = []

    def run(x: torch.Tensor) -> torch.Tensor:
        calls.append(x)
        if len(calls) == 2:  # the check, after the layers were swapped
            raise RuntimeError("out of memory")
        return model(x)

    x = torch.rand(1, 3, 16, 16)
    with caplog.at_level(logging.WARNING):
        assert fold_batchnorm(model, run, x) == 0
    assert "out of memory" in caplog.text
    assert model.conv is conv and model.bn is bn


def test_training_mode_and_half_precision_are_not_folded() -> None:
    training = _randomize_stats(ConvBn()).train()
    x = torch.rand(1, 3, 16, 16)
    assert fold_batchnorm(training, training, x) == 0 and _norms(training) == 1
    half = _randomize_stats(ConvBn()).to(torch.bfloat16)
    assert fold_batchnorm(half, half, x.to(torch.bfloat16)) == 0 and _norms(half) == 1


def test_timm_batchnorm_act_keeps_its_activation() -> None:
    from timm.layers import BatchNormAct2d

    class TimmBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = BatchNormAct2d(8, act_layer=torch.nn.ReLU6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn1(self.conv(x)).mean(dim=(2, 3))

    model = _randomize_stats(TimmBlock())
    folded, before, after = _fold(model)
    assert folded == 1 and _norms(model) == 0
    assert any(isinstance(m, torch.nn.ReLU6) for m in model.modules())
    assert before.min() >= 0 and torch.allclose(after, before, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return real_thumbnails(96)


def test_the_handler_folds_a_resnet_and_keeps_its_scores(
    tiny_resnet: Path, photos: list[Image.Image]
) -> None:
    from transformers import AutoModelForImageClassification

    spec = ModelSpec(str(tiny_resnet))
    loaded = classifier_handler(tiny_resnet).load_model()
    assert _norms(loaded.model) == 0
    reference = AutoModelForImageClassification.from_pretrained(tiny_resnet).eval()
    assert _norms(reference) > 0
    pre = ImagePreprocessor(spec)
    ours = ImageClassificationModelHandler.forward(pre(photos), loaded)  # uint8 pixels
    with torch.no_grad():
        pixel_values = torch.from_numpy(np.stack(pre.pixel_values(photos)))
        theirs = reference(pixel_values=pixel_values).logits.numpy()
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-5)


def test_the_example_input_follows_the_config() -> None:
    from transformers import MobileNetV2Config, ViTConfig

    assert example_input(ViTConfig(image_size=96), "cpu").shape == (1, 3, 96, 96)
    assert example_input(MobileNetV2Config(), "cpu").shape == (1, 3, 224, 224)

    class TimmLike:
        pretrained_cfg = {"input_size": [3, 160, 160]}
        num_channels = 3

    assert example_input(TimmLike(), "cpu").shape == (1, 3, 160, 160)
