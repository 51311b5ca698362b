"""`--compile` (torch.compile in the background, eager until ready) and `--quantize int8`.

Compiled forwards must give the labels transformers gives (scores within 1e-4),
for a transformer and for a CNN whose batch norms inductor folds into its
convolutions; a compiler failure must cost speed, never rows. int8 is checked
for what it is: close to fp32, not equal.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import (
    classifier_handler,
    read_output,
    real_thumbnails,
    run_job,
    zero_shot_handler,
)
from transforms.model.loading import ModelSpec
from transforms.model.preprocess import ImagePreprocessor
from transforms.model.speedups.compiled import CompiledForward
from transforms.rows import Prediction

TOL = 1e-4


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return real_thumbnails(96)


def _seed(model_dir: Path, images: list[Image.Image]) -> list[list[dict[str, Any]]]:
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(model_dir), device="cpu")
    return pipe(images, top_k=3)


def _predict(handler: Any, model: Any, pixel_values: list[np.ndarray]) -> list[Prediction]:
    results = list(handler.run_inference(pixel_values, model))
    assert all(isinstance(r, Prediction) for r in results), results
    return results


# -- CompiledForward ----------------------------------------------------------------


@pytest.mark.slow
def test_compiled_forward_switches_over_and_keeps_other_shapes_eager() -> None:
    calls: list[tuple[int, ...]] = []

    def eager(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return torch.tanh(x) * 2 + 1

    forward = CompiledForward(eager, batch_size=4, background=False)
    full, partial = torch.randn(4, 3), torch.randn(2, 3)
    expected = torch.tanh(full) * 2 + 1
    with torch.inference_mode():
        assert torch.allclose(forward(full), expected, atol=1e-6)
        assert forward.ready and forward.compile_seconds is not None
        assert forward(full + 0).shape == (4, 3)
        assert forward.compiled_calls == 2
        assert torch.allclose(forward(partial), torch.tanh(partial) * 2 + 1)
    assert forward.compiled_calls == 2  # the partial batch ran eagerly
    assert (2, 3) in calls


@pytest.mark.slow
def test_background_compile_runs_eager_until_ready() -> None:
    forward = CompiledForward(lambda x: x.relu() + 1, batch_size=2)
    x = torch.randn(2, 5)
    with torch.inference_mode():
        assert torch.equal(forward(x), x.relu() + 1)  # eager: compiling has only started
        assert forward.wait(timeout=300)
        assert torch.allclose(forward(x), x.relu() + 1)
    assert forward.compiled_calls == 1


def test_disabled_never_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    forward = CompiledForward(lambda x: x * 3, batch_size=2, enabled=False, background=False)
    assert torch.equal(forward(torch.ones(2, 2)), torch.full((2, 2), 3.0))
    assert not forward.ready


def test_a_compiler_failure_falls_back_to_eager(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    forward = CompiledForward(lambda x: x - 1, batch_size=2, background=False)
    with caplog.at_level(logging.WARNING, logger="transforms.model.speedups.compiled"):
        assert torch.equal(forward(torch.ones(2, 2)), torch.zeros(2, 2))
        assert torch.equal(forward(torch.ones(2, 2)), torch.zeros(2, 2))
    assert not forward.ready
    assert forward.failure is not None and "no C++ compiler" in forward.failure
    assert "torch.compile is off" in caplog.text


def test_a_failing_compiled_call_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def compile_to_broken(fn: Any, **kwargs: Any) -> Any:
        state = {"calls": 0}

        def compiled(x: Any) -> Any:
            state["calls"] += 1
            if state["calls"] > 1:  # the warm-up call works, the next one fails
                raise RuntimeError("guard failure")
            return fn(x)

        return compiled

    monkeypatch.setattr(torch, "compile", compile_to_broken)
    forward = CompiledForward(lambda x: x * 2, batch_size=2, background=False)
    assert torch.equal(forward(torch.ones(2)), torch.full((2,), 2.0))
    assert torch.equal(forward(torch.ones(2)), torch.full((2,), 2.0))  # eager after the failure
    assert forward.failure is not None and "guard failure" in forward.failure
    assert not forward.ready


# -- handlers -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny_vit", "tiny_resnet"])
def test_compiled_handler_matches_the_seed(
    request: pytest.FixtureRequest, photos: list[Image.Image], model_name: str
) -> None:
    model_dir = request.getfixturevalue(model_name)
    spec = ModelSpec(str(model_dir))
    handler = classifier_handler(model_dir, top_k=3, compile=True, batch_size=len(photos))
    model = handler.load_model()
    pixel_values = ImagePreprocessor(spec)(photos)
    first = _predict(handler, model, pixel_values)  # eager, and starts compiling
    assert model.logits is not None
    assert model.logits.wait(timeout=600), model.logits.failure
    compiled = _predict(handler, model, pixel_values)
    assert model.logits.compiled_calls == 1
    for results in (first, compiled):
        for mine, theirs in zip(results, _seed(model_dir, photos), strict=True):
            assert mine.labels == [d["label"] for d in theirs]
            assert mine.scores == pytest.approx([d["score"] for d in theirs], abs=TOL)


@pytest.mark.slow
def test_compiled_zero_shot_matches_eager(tiny_clip: Path, photos: list[Image.Image]) -> None:
    spec = ModelSpec(str(tiny_clip))
    labels = ("a cat", "a cup of coffee", "a rocket")
    pixel_values = ImagePreprocessor(spec)(photos)
    eager = zero_shot_handler(tiny_clip, labels, top_k=0)
    compiled = zero_shot_handler(tiny_clip, labels, top_k=0, compile=True, batch_size=len(photos))
    loaded = compiled.load_model()
    compiled.run_inference(pixel_values, loaded)
    assert loaded.image_features is not None and loaded.image_features.wait(timeout=600)
    ours = _predict(compiled, loaded, pixel_values)
    assert loaded.image_features.compiled_calls == 1
    for mine, theirs in zip(ours, _predict(eager, eager.load_model(), pixel_values), strict=True):
        assert mine.labels == theirs.labels
        assert mine.scores == pytest.approx(theirs.scores, abs=TOL)


def test_int8_quantizes_linear_layers_and_stays_close(
    tiny_vit: Path, photos: list[Image.Image]
) -> None:
    spec = ModelSpec(str(tiny_vit))
    pixel_values = ImagePreprocessor(spec)(photos)
    fp32 = classifier_handler(tiny_vit, top_k=0)
    int8 = classifier_handler(tiny_vit, top_k=0, quantize="int8")
    loaded = int8.load_model()
    kinds = {type(m).__module__ for m in loaded.model.modules()}
    assert any("quantized" in kind for kind in kinds), kinds
    exact = fp32.forward(pixel_values, fp32.load_model())
    approx = int8.forward(pixel_values, loaded)
    assert not np.array_equal(approx, exact)  # it did change the arithmetic
    assert np.linalg.norm(approx - exact) < 0.05 * np.linalg.norm(exact)
    assert len(_predict(int8, loaded, pixel_values)) == len(photos)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantize": "int4"}, "--quantize \\(quantize\\): 'int4' must be one of"),
        ({"quantize": "int8", "device": "cuda"}, "CPU only"),
        ({"quantize": "int8", "precision": "bf16"}, "fp32"),
    ],
)
def test_bad_quantize_options_are_refused(
    tiny_vit: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        classifier_handler(tiny_vit, **options)


def test_cli_refuses_int8_on_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_job(
        ["--input", "x.txt", "--output", str(tmp_path), "--quantize", "int8", "--device", "cuda"]
    )
    assert code == 2
    assert "--quantize" in capsys.readouterr().err


@pytest.mark.slow
def test_job_with_compile_and_int8_labels_every_row(
    tiny_vit: Path,
    photo_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """End to end through the CLI: the same rows and labels as an eager fp32 run, and
    the compiled run really ran compiled batches (it compiles on the first full batch)."""
    monkeypatch.setenv("IMAGE_LABELER_COMPILE_BLOCKING", "1")
    manifest = tmp_path / "images.txt"
    paths = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    manifest.write_text("\n".join(paths) + "\n")
    common = ["--input", str(manifest), "--model", str(tiny_vit), "--batch-size", "2"]
    assert run_job([*common, "--output", str(tmp_path / "eager")]) == 0
    with caplog.at_level(logging.INFO, logger="transforms.model.speedups.compiled"):
        assert run_job([*common, "--output", str(tmp_path / "fast"), "--compile"]) == 0
    assert "The compiled forward pass ran its first batch" in caplog.text
    assert run_job([*common, "--output", str(tmp_path / "int8"), "--quantize", "int8"]) == 0
    reference = read_output(tmp_path / "eager").sort_by("uri").to_pydict()
    for name in ("fast", "int8"):
        table = read_output(tmp_path / name).sort_by("uri").to_pydict()
        assert table["uri"] == reference["uri"]
        assert set(table["status"]) == {"ok"}
    fast = read_output(tmp_path / "fast").sort_by("uri").to_pydict()
    assert fast["label"] == reference["label"]
    assert fast["score"] == pytest.approx(reference["score"], abs=TOL)
