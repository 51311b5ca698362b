"""Static padding for TF-padded MobileNets: same logits at every input size, fewer copies.

The rewrite is on by default, so it must give the logits transformers gives,
for inputs of any size (it is checked on one size only when a model loads),
and leave the model as it was whenever it cannot.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    MobileNetV1Config,
    MobileNetV1ForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    MobileNetV2ImageProcessor,
)

from tests.conftest import classifier_handler, randomize_batchnorms, real_thumbnails
from transforms.model.loading import ModelSpec
from transforms.model.preprocess import ImagePreprocessor
from transforms.model.speedups.static_padding import make_tf_padding_static


def _realistic(model: Any) -> Any:
    """Random weights with non-trivial norms and logits (init leaves them ~1e-20)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)
    randomize_batchnorms(model, mean=(-0.2, 0.2), weight=(0.8, 1.2), bias=(-0.1, 0.1))
    return model.eval()


def _mobilenet_v2(**overrides: Any) -> Any:
    config = MobileNetV2Config(depth_multiplier=0.35, image_size=64, num_labels=5, **overrides)  # type: ignore[call-arg]
    return _realistic(MobileNetV2ForImageClassification(config))


def _mobilenet_v1() -> Any:
    config = MobileNetV1Config(depth_multiplier=0.25, image_size=64, num_labels=5)  # type: ignore[call-arg]
    return _realistic(MobileNetV1ForImageClassification(config))


def _logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).logits


def _pad_calls(model: Any, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many times one forward pass calls `F.pad`."""
    calls = []
    original = torch.nn.functional.pad

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "pad", counting)
        _logits(model, x)
    return len(calls)


def _strided_convs(model: Any) -> int:
    return sum(
        1
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and any(s != 1 for s in m.stride)
    )


@pytest.mark.parametrize("build", [_mobilenet_v2, _mobilenet_v1], ids=["v2", "v1"])
def test_same_logits_at_any_input_size_and_only_strided_layers_pad(
    build: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build()
    reference = copy.deepcopy(model)
    example = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pads_before = _pad_calls(model, example, monkeypatch)

    changed = make_tf_padding_static(model, lambda x: _logits(model, x), example)

    assert changed > 0 and changed + _strided_convs(model) == pads_before
    assert _pad_calls(model, example, monkeypatch) == _strided_convs(model)
    # Odd and even sides, square or not: stride-1 "SAME" padding never depends on them.
    for height, width in ((64, 64), (97, 131), (50, 33), (224, 224)):
        x = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        expected = _logits(reference, x)
        assert expected.abs().max() > 1e-3  # logits that can tell a wrong padding apart
        torch.testing.assert_close(_logits(model, x), expected, rtol=1e-4, atol=1e-5)


def test_the_models_own_config_is_unchanged(tmp_path: Path) -> None:
    model = _mobilenet_v2()
    make_tf_padding_static(model, lambda x: _logits(model, x), torch.rand(1, 3, 64, 64))
    assert model.config.tf_padding is True
    model.save_pretrained(tmp_path)
    assert MobileNetV2Config.from_pretrained(tmp_path).tf_padding is True


def test_models_without_tf_padding_are_left_alone() -> None:
    model = _mobilenet_v2(tf_padding=False)
    assert make_tf_padding_static(model, lambda x: _logits(model, x), torch.rand(1, 3, 64, 64)) == 0


def test_a_mismatch_restores_every_layer(caplog: pytest.LogCaptureFixture) -> None:
    model = _mobilenet_v2()
    layers = [m for m in model.modules() if type(m).__name__ == "MobileNetV2ConvLayer"]
    before = [(m.config, m.convolution.padding) for m in layers]
    calls = []

    def run(x: torch.Tensor) -> torch.Tensor:
        calls.append(x)
        logits = _logits(model, x)
        return logits + 1.0 if len(calls) == 2 else logits  # the check sees a difference

    with caplog.at_level(logging.WARNING):
        assert make_tf_padding_static(model, run, torch.rand(1, 3, 64, 64)) == 0
    assert "differs" in caplog.text
    assert [(m.config, m.convolution.padding) for m in layers] == before


def test_a_model_that_fails_on_the_example_is_left_alone() -> None:
    model = _mobilenet_v2()
    paddings = [m.padding for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

    def run(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("needs another input size")

    assert make_tf_padding_static(model, run, torch.rand(1, 3, 64, 64)) == 0
    assert [m.padding for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == paddings


def test_the_handler_matches_transformers_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import pipeline

    model = _mobilenet_v2()
    model.config.id2label = {i: f"kind_{i}" for i in range(5)}
    model.config.label2id = {f"kind_{i}": i for i in range(5)}
    model.save_pretrained(tmp_path)
    MobileNetV2ImageProcessor(
        size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64}
    ).save_pretrained(tmp_path)
    spec = ModelSpec(str(tmp_path))

    loaded = classifier_handler(tmp_path).load_model()
    pixel_values = ImagePreprocessor(spec).pixel_values(real_thumbnails(96))
    assert _pad_calls(
        loaded.model, torch.from_numpy(np.stack(pixel_values[:1])), monkeypatch
    ) == _strided_convs(loaded.model)

    ours = classifier_handler(tmp_path, top_k=5).run_inference(pixel_values, loaded)
    theirs = pipeline("image-classification", model=str(tmp_path), device="cpu")(
        real_thumbnails(96), top_k=5
    )
    for prediction, expected in zip(ours, theirs, strict=True):
        assert not isinstance(prediction, Exception)
        assert prediction.labels == [e["label"] for e in expected]
        assert prediction.scores == pytest.approx([e["score"] for e in expected], abs=1e-5)
