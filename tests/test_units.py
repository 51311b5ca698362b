"""Tier 1: pure functions (postprocess, errors, batching, decode)."""

from __future__ import annotations

import io
import pickle
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import default_fetch
from transforms.errors import ErrorCode, RowError, Status, format_error, redact, redact_uri
from transforms.images.decode import decode_image
from transforms.images.fetch import check_uri, fetch_bytes
from transforms.model.batching import BatchSettings, batch_settings
from transforms.model.postprocess import (
    ClassificationFunction,
    apply_function,
    resolve_function,
    top_k_predictions,
)


def _config(num_labels: int, problem_type: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(num_labels=num_labels, problem_type=problem_type)


@pytest.mark.parametrize(
    ("num_labels", "problem_type", "expected"),
    [
        (10, None, "softmax"),
        (10, "single_label_classification", "softmax"),
        (10, "multi_label_classification", "sigmoid"),
        (1, None, "sigmoid"),
        (3, "regression", "none"),
    ],
)
def test_default_function(num_labels: int, problem_type: str | None, expected: str) -> None:
    function = resolve_function("default", _config(num_labels, problem_type))
    assert function.value == expected


def test_explicit_function_wins() -> None:
    assert resolve_function("none", _config(10)) is ClassificationFunction.NONE


def test_bad_function_is_rejected() -> None:
    with pytest.raises(ValueError):
        resolve_function("tanh", _config(10))


def test_softmax_and_sigmoid_values() -> None:
    logits = np.array([[0.0, 1.0, 2.0]], dtype=np.float32)
    soft = apply_function(logits, ClassificationFunction.SOFTMAX)
    assert soft.sum() == pytest.approx(1.0)
    assert soft[0, 2] == pytest.approx(np.exp(2) / np.exp([0, 1, 2]).sum(), rel=1e-6)
    sig = apply_function(logits, ClassificationFunction.SIGMOID)
    assert sig[0, 0] == pytest.approx(0.5)
    assert apply_function(logits, ClassificationFunction.NONE) is logits


def test_softmax_is_stable_for_large_logits() -> None:
    logits = np.array([[1000.0, 1001.0]], dtype=np.float32)
    scores = apply_function(logits, ClassificationFunction.SOFTMAX)
    assert np.isfinite(scores).all()


@pytest.mark.parametrize(("top_k", "expected_len"), [(1, 1), (3, 3), (4, 4), (9, 4), (0, 4)])
def test_top_k_caps_and_orders(top_k: int, expected_len: int) -> None:
    scores = np.array([[0.1, 0.4, 0.3, 0.2]], dtype=np.float32)
    id2label = {0: "a", 1: "b", 2: "c", 3: "d"}
    (pred,) = top_k_predictions(scores, id2label, top_k)
    assert pred.labels == ["b", "c", "d", "a"][:expected_len]
    assert pred.scores == pytest.approx([0.4, 0.3, 0.2, 0.1][:expected_len])


def test_top_k_ties_keep_label_order() -> None:
    """transformers sorts with a stable sort, so equal scores keep label order."""
    scores = np.array([[0.25, 0.25, 0.5, 0.25]], dtype=np.float32)
    (pred,) = top_k_predictions(scores, {0: "a", 1: "b", 2: "c", 3: "d"}, 4)
    assert pred.labels == ["c", "a", "b", "d"]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://h.example/a.jpg?X-Goog-Signature=abc&x=1", "https://h.example/a.jpg?<redacted>"),
        ("https://user:pw@h.example/a.jpg", "https://h.example/a.jpg"),
        ("gs://bucket/a.jpg", "gs://bucket/a.jpg"),
        ("/local/a.jpg", "/local/a.jpg"),
    ],
)
def test_redact_uri(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_error_messages_are_redacted() -> None:
    text = format_error(ErrorCode.HTTP_404, "GET https://h/x.jpg?token=SECRET failed")
    assert "SECRET" not in text
    assert text.startswith("http_404: ")
    assert "SECRET" not in redact("see http://a/b?sig=SECRET and s3://b/k?X=SECRET")


def test_row_error_status() -> None:
    assert RowError(ErrorCode.NOT_FOUND, "x").status is Status.FETCH_ERROR
    assert RowError(ErrorCode.TRUNCATED, "x").status is Status.DECODE_ERROR
    assert RowError(ErrorCode.EMPTY_URI, "x").status is Status.INVALID_INPUT
    assert RowError(ErrorCode.INFERENCE_FAILED, "x").status is Status.INFERENCE_ERROR


def test_batch_settings() -> None:
    assert batch_settings(batch_size=None, device="cpu").max_batch_size == 4
    assert batch_settings(batch_size=None, device="cuda").max_batch_size == 64
    # "auto" on remote workers: BatchElements may grow batches to the GPU size.
    auto = batch_settings(batch_size=None, device="auto")
    assert auto.as_kwargs() == {"min_batch_size": 4, "max_batch_size": 64}
    assert batch_settings(batch_size=8, device="auto").max_batch_size == 8
    fixed = batch_settings(batch_size=8, device="cpu")
    assert fixed.as_kwargs() == {"min_batch_size": 8, "max_batch_size": 8}
    flexible = batch_settings(
        batch_size=8, device="cpu", min_batch_size=2, max_batch_duration_secs=5
    )
    assert flexible.as_kwargs() == {
        "min_batch_size": 2,
        "max_batch_size": 8,
        "max_batch_duration_secs": 5,
    }
    with pytest.raises(ValueError):
        BatchSettings(min_batch_size=9, max_batch_size=8)


# ---- URIs and fetch -------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "code"),
    [
        ("", ErrorCode.EMPTY_URI),
        ("   ", ErrorCode.EMPTY_URI),
        (None, ErrorCode.EMPTY_URI),
        ("ftp://h/a.jpg", ErrorCode.UNSUPPORTED_SCHEME),
        ("data://x", ErrorCode.UNSUPPORTED_SCHEME),
    ],
)
def test_invalid_uris(uri: str | None, code: ErrorCode) -> None:
    with pytest.raises(RowError) as info:
        check_uri(uri, default_fetch())
    assert info.value.code is code
    assert info.value.status is Status.INVALID_INPUT


def test_scheme_allowlist_can_exclude_http() -> None:
    with pytest.raises(RowError) as info:
        check_uri("https://h/a.jpg", default_fetch(allowed_schemes=("file",)))
    assert info.value.code is ErrorCode.UNSUPPORTED_SCHEME


def test_fetch_missing_file(tmp_path) -> None:
    with pytest.raises(RowError) as info:
        fetch_bytes(str(tmp_path / "nope.jpg"), default_fetch())
    assert info.value.code is ErrorCode.NOT_FOUND


def test_fetch_too_large(tmp_path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 1000)
    with pytest.raises(RowError) as info:
        fetch_bytes(str(path), default_fetch(max_bytes=999))
    assert info.value.code is ErrorCode.TOO_LARGE
    assert fetch_bytes(str(path), default_fetch(max_bytes=1000)) == b"x" * 1000


# ---- decode ---------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


#: Mode and format pairs Pillow cannot write (so no such file can reach the decoder).
UNWRITABLE = {
    ("CMYK", "PNG"),
    ("RGBA", "JPEG"),
    ("P", "JPEG"),
    ("LA", "JPEG"),
    ("I;16", "JPEG"),
    ("CMYK", "BMP"),
    ("LA", "BMP"),
    ("I;16", "BMP"),
    ("CMYK", "GIF"),
}


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "1", "LA", "I;16"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "WEBP", "BMP", "GIF"])
def test_decode_modes_and_formats(mode: str, fmt: str) -> None:
    base = Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    image = base.convert(mode) if mode != "I;16" else base.convert("L").convert("I;16")
    if (mode, fmt) in UNWRITABLE:  # stays true, or the pair joins the decoded ones
        with pytest.raises((OSError, ValueError, KeyError)):
            _encode(image, fmt)
        return
    data = _encode(image, fmt)
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    assert decoded.size == (32, 24)


def test_decode_applies_exif_orientation() -> None:
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    decoded = decode_image(_encode(image, "JPEG", exif=exif))
    assert decoded.size == (20, 40)


def test_jpeg_draft_decodes_large_images_smaller() -> None:
    image = Image.new("RGB", (2000, 1600), "blue")
    data = _encode(image, "JPEG")
    full = decode_image(data)
    draft = decode_image(data, draft_side=448)
    assert full.size == (2000, 1600)
    # 1/2 scale keeps both sides >= 448; 1/4 (500x400) would not.
    assert draft.size == (1000, 800)
    small = decode_image(_encode(Image.new("RGB", (500, 375)), "JPEG"), draft_side=448)
    assert small.size == (500, 375)


def _truncated_jpeg() -> bytes:
    rng = np.random.default_rng(2)
    data = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", ErrorCode.EMPTY_FILE),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", ErrorCode.NOT_AN_IMAGE),
        (
            b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>',
            ErrorCode.NOT_AN_IMAGE,
        ),
        (b"just some text\n", ErrorCode.NOT_AN_IMAGE),
        (_truncated_jpeg(), ErrorCode.TRUNCATED),
    ],
)
def test_decode_errors(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(RowError) as info:
        decode_image(data)
    assert info.value.code is code
    assert info.value.status is Status.DECODE_ERROR


def test_decompression_bomb_is_refused_before_decoding() -> None:
    data = _encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(RowError) as info:
        decode_image(data, max_pixels=1_000_000)
    assert info.value.code is ErrorCode.TOO_LARGE
    assert info.value.status is Status.DECODE_ERROR
    assert pickle.loads(pickle.dumps(info.value)).status is Status.DECODE_ERROR


def test_extension_does_not_matter(tmp_path) -> None:
    """A PNG saved as .jpg decodes by content."""
    path = tmp_path / "really_a_png.jpg"
    Image.new("RGB", (10, 10), "green").save(path, format="PNG")
    assert decode_image(fetch_bytes(str(path), default_fetch())).size == (10, 10)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decode_never_raises_anything_but_row_error(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=4_000_000)
    except RowError as e:
        assert e.status is Status.DECODE_ERROR
    else:
        assert image.mode == "RGB"


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=2000))
def test_decode_of_any_jpeg_prefix_is_a_row_or_an_image(cut: int) -> None:
    data = _encode(Image.new("RGB", (48, 48), "purple"), "JPEG")[:cut]
    try:
        decode_image(data)
    except RowError as e:
        assert e.status is Status.DECODE_ERROR


def test_out_of_memory_halves_the_batch_until_it_fits() -> None:
    """GPU readiness without a GPU: a fake forward that runs out of memory above 2 images."""
    import torch

    from transforms.model.handler_base import TorchHandlerBase
    from transforms.model.postprocess import ClassificationFunction
    from transforms.rows import Prediction
    from transforms.spec import LabelingSpec

    sizes: list[int] = []

    class Loaded:
        def __call__(self, batch: Any) -> np.ndarray:
            return Fake.forward(batch, self)

    class Fake(TorchHandlerBase[Loaded]):
        @staticmethod
        def forward(batch: Any, model: Any) -> np.ndarray:
            sizes.append(len(batch))
            if len(batch) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
            return np.stack([[0.0, float(x[0])] for x in batch])

    handler = Fake(
        LabelingSpec(model="unused", top_k=1, device="cpu", batch_size=8).handler,
        id2label={0: "a", 1: "b"},
        function=ClassificationFunction.SOFTMAX,
    )
    batch = [np.array([float(i % 2) * 5]) for i in range(8)]
    results = list(handler.run_inference(batch, Loaded()))
    assert len(results) == 8 and all(isinstance(r, Prediction) for r in results)
    assert [r.labels[0] for r in results if isinstance(r, Prediction)] == ["a", "b"] * 4
    assert sizes == [8, 4, 2, 2, 4, 2, 2]


def test_auto_device_batches_for_a_gpu_and_runs_cpu_sized_passes_on_a_cpu() -> None:
    """--device auto on remote workers: BatchElements may send GPU-sized batches
    (64); a worker whose "auto" is the CPU (this machine) runs them 4 at a time."""
    from transforms.model.handler_base import TorchHandlerBase
    from transforms.model.postprocess import ClassificationFunction
    from transforms.spec import LabelingSpec

    sizes: list[int] = []

    class Fake(TorchHandlerBase[Any]):
        def _predict(self, batch: Any, model: Any) -> list[Any]:
            sizes.append(len(batch))
            return self.postprocess(np.zeros((len(batch), 2), np.float32))

    settings = LabelingSpec(model="unused", top_k=1, device="auto").handler
    assert settings.batching.as_kwargs() == {"min_batch_size": 4, "max_batch_size": 64}
    handler = Fake(settings, id2label={0: "a", 1: "b"}, function=ClassificationFunction.SOFTMAX)
    assert handler.batch_elements_kwargs()["max_batch_size"] == 64
    assert len(list(handler.run_inference([np.zeros(1)] * 10, object()))) == 10
    assert sizes == [4, 4, 2]  # torch sees no GPU here
    sizes.clear()
    given = LabelingSpec(model="unused", device="auto", batch_size=16).handler
    handler = Fake(given, id2label={0: "a", 1: "b"}, function=ClassificationFunction.SOFTMAX)
    list(handler.run_inference([np.zeros(1)] * 16, object()))
    assert sizes == [16]  # an explicit --batch-size is the forward pass everywhere


def test_other_errors_are_not_mistaken_for_out_of_memory() -> None:
    from transforms.model.device import is_out_of_memory

    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_cuda_batches_are_pinned_and_copied_without_blocking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GPU readiness without a GPU: record what the copy to "cuda" asks torch for."""
    import torch

    from transforms.model.device import batch_to_device
    from transforms.model.pixels import Normalization

    calls: list[tuple[str, Any]] = []

    def pin_memory(self: torch.Tensor) -> torch.Tensor:
        calls.append(("pin_memory", None))
        return self

    original_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(("to", (args, dict(kwargs))))
        kwargs.pop("non_blocking", None)
        return original_to(self, *[a for a in args if a != "cuda"], **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    batch = [np.zeros((3, 4, 4), np.float32), np.ones((3, 4, 4), np.float32)]
    out = batch_to_device(batch, "cuda", torch.float16, None)
    assert calls[0] == ("pin_memory", None)
    assert calls[1] == ("to", (("cuda",), {"non_blocking": True}))
    assert tuple(out.shape) == (2, 3, 4, 4) and out.dtype == torch.float16
    calls.clear()
    out = batch_to_device(batch, "cpu", torch.float32, None)
    assert [name for name, _ in calls] == ["to"]  # no pinning on CPU
    # uint8 pixels cross as uint8 (a quarter of the bytes), then are normalized.
    calls.clear()
    pixels = [np.full((3, 4, 4), 255, np.uint8)] * 2
    normalization = Normalization(255.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = batch_to_device(pixels, "cuda", torch.float16, normalization)
    assert calls[1] == ("to", (("cuda",), {"non_blocking": True}))
    assert out.dtype == torch.float16 and bool((out == 1.0).all())
    with pytest.raises(ValueError, match="no normalization"):
        batch_to_device(pixels, "cpu", torch.float32, None)


def test_cpu_batches_are_normalized_into_one_reused_float_batch_per_thread() -> None:
    """A float32 batch above glibc's mmap threshold would be fresh pages every
    forward pass: under inference mode (as the forward passes run) each thread
    reuses its own, and every batch's values are its own."""
    import threading

    import torch

    from transforms.model.device import batch_to_device
    from transforms.model.pixels import Normalization

    normalization = Normalization(255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    rng = np.random.default_rng(0)

    def batch(n: int) -> list[np.ndarray]:
        return [rng.integers(0, 256, (3, 16, 16), dtype=np.uint8) for _ in range(n)]

    def expected(pixels: list[np.ndarray]) -> torch.Tensor:
        values = torch.from_numpy(np.stack(pixels)).to(torch.float32).div(255.0)
        mean = torch.tensor(normalization.mean).view(1, -1, 1, 1)
        return (values - mean) / torch.tensor(normalization.std).view(1, -1, 1, 1)

    def forward_input(pixels: list[np.ndarray], memory_format: Any = None) -> torch.Tensor:
        with torch.inference_mode():
            return batch_to_device(pixels, "cpu", torch.float32, normalization, memory_format)

    first, second = batch(4), batch(4)
    out = forward_input(first)
    assert torch.equal(out, expected(first))
    address = out.data_ptr()
    out = forward_input(second)
    assert out.data_ptr() == address  # the same memory, rewritten
    assert torch.equal(out, expected(second))
    tail = batch(3)  # a bundle's last, smaller batch gets its own shape
    assert torch.equal(forward_input(tail), expected(tail))
    # A CNN's layout is applied to the uint8 stack; the values are the same.
    out = forward_input(second, torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected(second))
    # Outside inference mode (the probe check when a model loads, in a thread that
    # already ran forward passes of that shape) the batch is a fresh tensor, and
    # the thread's reused batch keeps its values. (Compared with the batch that is
    # kept now, alive: an earlier one's freed memory may be handed out again.)
    kept = forward_input(first)
    outside = batch_to_device(second, "cpu", torch.float32, normalization)
    assert outside.data_ptr() != kept.data_ptr() and torch.equal(outside, expected(second))
    assert torch.equal(kept, expected(first))
    # A view that is not one dense batch (a grey channel broadcast to three) is
    # converted, not reused: a buffer laid out like it would alias the channels.
    grey = torch.from_numpy(first[0][:1]).unsqueeze(0).expand(1, 3, -1, -1)
    with torch.inference_mode():
        assert torch.equal(normalization.apply(grey), expected([np.repeat(first[0][:1], 3, 0)]))
    # Another thread (the other bundle thread) never writes into this one's batch.
    mine = forward_input(first)
    theirs: list[int] = []
    thread = threading.Thread(target=lambda: theirs.append(forward_input(second).data_ptr()))
    thread.start()
    thread.join()
    assert theirs[0] != mine.data_ptr() and torch.equal(mine, expected(first))


# -- local runner -----------------------------------------------------------------


def test_local_runs_default_to_two_worker_threads() -> None:
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    from pipelines.runner import LOCAL_WORKERS, in_process, make_runner

    options = PipelineOptions([])
    assert make_runner(options) is not None
    direct = options.view_as(DirectOptions)
    assert (direct.direct_num_workers, direct.direct_running_mode) == (
        LOCAL_WORKERS,
        "multi_threading",
    )
    assert in_process(options)  # threads share one preloaded model


@pytest.mark.parametrize(
    "args",
    [["--direct_num_workers", "1"], ["--direct_running_mode", "multi_processing"]],
)
def test_explicit_direct_options_are_kept(args: list[str]) -> None:
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    from pipelines.runner import make_runner

    options = PipelineOptions(args)
    make_runner(options)
    direct = options.view_as(DirectOptions)
    given = PipelineOptions(args).view_as(DirectOptions)
    assert direct.direct_num_workers == given.direct_num_workers
    assert direct.direct_running_mode == given.direct_running_mode


def test_dataflow_runs_are_left_to_beam() -> None:
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    from pipelines.runner import make_runner

    options = PipelineOptions(["--runner", "DataflowRunner"])
    assert make_runner(options) is None
    assert options.view_as(DirectOptions).direct_num_workers == 1


def test_malloc_thresholds_apply_once_unless_the_environment_chose() -> None:
    import os
    import subprocess
    import sys

    code = "from transforms.allocator import tune_malloc; print(tune_malloc(), tune_malloc())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("LD_PRELOAD", None)
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": root},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["True", "True"]
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": root, "MALLOC_TRIM_THRESHOLD_": "1048576"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["False", "False"]


# ---- the collector around a CLI run (pipelines.heap) ----------------------------


@pytest.mark.parametrize("before", ["on", pytest.param("off", marks=pytest.mark.slow)])
def test_importing_the_job_keeps_the_callers_collector_setting(before: str) -> None:
    import subprocess
    import sys

    code = (
        "import gc\n"
        f"{'gc.enable()' if before == 'on' else 'gc.disable()'}\n"
        "import pipelines.label_images\n"
        "print(gc.isenabled(), gc.get_freeze_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Paused only while the module imported; nothing frozen for a library caller.
    assert out.stdout.split() == [str(before == "on"), "0"]


@pytest.mark.parametrize(
    "entry, walks_the_import",
    [
        ("pipelines.cli", False),
        pytest.param("pipelines.label_images", True, marks=pytest.mark.slow),
    ],
)
def test_the_command_never_walks_what_the_job_module_imported(
    entry: str, walks_the_import: bool
) -> None:
    """The console script's entry point imports the job module with the collector
    paused and keeps it paused until `main` freezes start-up; entered at the job
    module, the import turns it back on and its first pass walks every object."""
    import subprocess
    import sys

    code = (
        "import gc, sys\n"
        "young = []\n"
        "def seen(phase, info):\n"
        "    if phase == 'start':\n"
        "        young.append(gc.get_count()[0])\n"
        "gc.callbacks.append(seen)\n"
        "sys.argv = ['label-images', 'report', '--help']\n"
        f"from {entry} import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('ENABLED', gc.isenabled())\n"
        "print('LARGEST', max(young, default=0))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    largest = int(out.stdout.split("LARGEST")[-1])
    # A pass over the import's objects starts with ~400,000 young ones; the
    # usual threshold is 700.
    assert (largest > 100_000) is walks_the_import, largest
    assert "ENABLED True" in out.stdout  # on again for the subcommand


def test_freeze_leaves_what_exists_to_reference_counting_and_collects_the_rest() -> None:
    import gc
    import weakref

    from pipelines import heap

    class Node:
        other: Any = None

    def cycle() -> weakref.ref[Node]:
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    was_on = heap.pause()
    try:
        frozen = cycle()  # garbage already, but frozen with everything else
        heap.freeze()
        assert gc.isenabled()
        later = cycle()  # made after the freeze: collected as usual
        gc.collect()
        assert later() is None and frozen() is not None
    finally:
        gc.unfreeze()
        gc.collect()
        heap.resume(was_on)
    assert frozen() is None


# ---- decode threads: one pool per process ---------------------------------------


def test_the_decode_instances_of_a_process_share_one_pool_of_decode_threads(tmp_path) -> None:
    import dataclasses
    import os

    from transforms.fetch_decode import FetchDecodePreprocess
    from transforms.spec import LabelingSpec

    class Gray:  # a preprocessor: the decoded image's mean, as a 1x1x1 array
        draft_side = 224

        def setup(self) -> None: ...

        def __call__(self, images: Any) -> list[np.ndarray]:
            return [np.asarray(image, dtype=np.float32).mean().reshape(1, 1, 1) for image in images]

    spec = LabelingSpec()
    assert spec.decode.threads is None  # default: one per core this process may use
    assert spec.decode.decode_threads == min(len(os.sched_getaffinity(0)), 8)
    decode = dataclasses.replace(spec.decode, threads=3)
    first, second = (FetchDecodePreprocess(Gray(), spec.fetch, decode) for _ in range(2))
    first.setup()
    second.setup()
    try:
        assert first._decode_pool is second._decode_pool
        assert first._decode_pool._max_workers == 3
        photo = tmp_path / "a.png"
        Image.new("RGB", (8, 8), (10, 20, 30)).save(photo)
        from transforms.rows import ImageRow

        row = ImageRow(index="m:0", uri=str(photo))
        first.teardown()  # the other instance keeps the pool
        pixels = second.load(row)
        assert isinstance(pixels, np.ndarray) and pixels.item() == 20.0
    finally:
        second.teardown()
    assert second._decode_pool._shutdown  # the last one out shuts it down


@pytest.mark.parametrize("cap", [1, 5, 32])
def test_a_bundle_thread_over_its_cap_waits_for_several_rows_not_for_each(
    tmp_path, monkeypatch: pytest.MonkeyPatch, cap: int
) -> None:
    """Every row comes out once; a bundle thread at its in-flight cap is woken
    once per few finished rows (a quarter of the cap, up to WAKE_AFTER_ROWS)."""
    import dataclasses

    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import MIN_TIMESTAMP

    from transforms import fetch_decode
    from transforms.fetch_decode import WAKE_AFTER_ROWS, FetchDecodePreprocess
    from transforms.rows import ImageRow
    from transforms.spec import LabelingSpec

    class Gray:
        draft_side = 224

        def setup(self) -> None: ...

        def __call__(self, images: Any) -> list[np.ndarray]:
            return [np.asarray(image, dtype=np.float32).mean().reshape(1, 1, 1) for image in images]

    rows = []
    for i in range(60):
        path = tmp_path / f"{i}.png"
        Image.new("L", (8, 8), i).save(path)
        rows.append(ImageRow(index=f"m:{i}", uri=str(path)))
    rows.append(ImageRow(index="m:bad", uri=str(tmp_path / "missing.png")))
    spec = LabelingSpec()
    fetch = dataclasses.replace(spec.fetch, concurrency=cap)
    decode = dataclasses.replace(spec.decode, threads=2)
    waits: list[int] = []
    wait_for = FetchDecodePreprocess._wait_for

    def counted(self: FetchDecodePreprocess, wanted: int) -> None:
        assert wanted <= self._in_flight  # never waits for rows that are not coming
        waits.append(wanted)
        wait_for(self, wanted)

    monkeypatch.setattr(fetch_decode.FetchDecodePreprocess, "_wait_for", counted)
    dofn = FetchDecodePreprocess(Gray(), fetch, decode)
    dofn.setup()
    try:
        out = []
        for row in rows:
            out += list(dofn.process(row, MIN_TIMESTAMP, GlobalWindow()))
            assert dofn._in_flight <= cap
        while_processing = list(waits)
        out += list(dofn.finish_bundle())
    finally:
        dofn.teardown()
    results = {item.value[0].index: item.value[1] for item in out}
    assert len(out) == len(rows) == len(results)
    assert [results[f"m:{i}"].item() for i in range(60)] == [float(i) for i in range(60)]
    assert isinstance(results["m:bad"], RowError)
    per_wake = min(WAKE_AFTER_ROWS, max(1, cap // 4))
    assert all(wanted == per_wake for wanted in while_processing)
    assert all(wanted <= WAKE_AFTER_ROWS for wanted in waits)  # finish_bundle: the rest
    # Woken per row, a cap of 32 would wait about 30 times here.
    assert len(waits) <= len(rows) // per_wake + 2


def test_the_default_decode_threads_follow_the_cores_up_to_a_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses
    import os

    from transforms.images.decode import MAX_DEFAULT_DECODE_THREADS
    from transforms.spec import LabelingSpec

    decode = LabelingSpec().decode
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(3)))
    assert decode.decode_threads == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)))
    assert decode.decode_threads == MAX_DEFAULT_DECODE_THREADS == 8
    assert dataclasses.replace(decode, threads=12).decode_threads == 12  # given: as given
