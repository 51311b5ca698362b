"""What our torch ModelHandlers share.

RunInference owns batching, model sharing and metrics; a handler only loads
its model and runs one batch. The base class holds the rest, once: option
checks at construction, BatchElements settings, model sharing for GPU
workers, torch threads, preloading for in-process runs, and per-image
isolation of inference failures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from transforms.batching import BatchSettings, batch_settings
from transforms.compiled import CompiledForward
from transforms.errors import RowError
from transforms.inference import isolate_failures, start_preload, take_preloaded
from transforms.models import ModelSpec
from transforms.postprocess import apply_function, top_k_predictions
from transforms.rows import Prediction

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
QUANTIZATIONS = ("none", "int8")
DEVICES = ("auto", "cpu", "cuda")
METRICS_NAMESPACE = "image_labeler"

LoadedT = TypeVar("LoadedT")


def resolve_device(device: str) -> str:
    """ "auto" means cuda when torch sees a GPU, else cpu."""
    import torch

    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device


def torch_dtype(precision: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def batch_to_device(batch: Sequence[np.ndarray], device: str, dtype: Any) -> Any:
    """Stack a batch into one tensor on `device`.

    On CUDA the host tensor is pinned and copied with `non_blocking=True`, so
    the copy overlaps the work already queued on the GPU; on CPU the stacked
    array is used in place (`torch.from_numpy` shares its memory).
    """
    import torch

    tensor = torch.from_numpy(np.stack(batch))
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, dtype=dtype, non_blocking=True)
    return tensor.to(dtype=dtype)


def check_quantize(quantize: str, device: str, precision: str) -> None:
    """Reject a quantization that cannot run with this device and precision."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    if quantize != "none" and device == "cuda":
        raise ValueError("quantize int8 runs on CPU only; use --precision fp16 on a GPU")
    if quantize != "none" and precision != "fp32":
        raise ValueError("quantize int8 needs --precision fp32 (it quantizes fp32 weights)")


def quantize_int8(model: Any) -> Any:
    """Dynamic int8 quantization of every `nn.Linear` (weights int8, activations
    quantized per batch): for transformers (ViT, CLIP) on CPU, where Linear
    layers are nearly all of the compute. Convolutions stay fp32.
    """
    import warnings

    import torch

    quantize_dynamic = getattr(torch.ao.quantization, "quantize_dynamic", None)
    if quantize_dynamic is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic; "
            "run without --quantize"
        )
    with warnings.catch_warnings():
        # Deprecated in favour of torchao, still present and working in the pinned torch.
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def to_predictions(
    logits: np.ndarray, function: Any, id2label: dict[int, str], top_k: int
) -> list[Prediction]:
    """Score function and top-k labels of a batch's logits (what a loaded model's
    `__call__(batch, top_k)` returns)."""
    return top_k_predictions(apply_function(logits, function), id2label, top_k)


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error."""
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TorchHandlerBase(
    ModelHandler[np.ndarray, "Prediction | RowError", LoadedT], Generic[LoadedT]
):
    """Base of the image-classification and zero-shot handlers.

    Args:
        spec: which model to load.
        top_k: labels kept per image (capped at the label count); 0 keeps all.
        device: "auto", "cpu" or "cuda".
        precision: "fp32", "fp16" or "bf16" (fp16 needs a GPU).
        batching: BatchElements settings (`transforms.batching.batch_settings`).
        model_copies: models loaded per worker machine, shared across its
            processes (GPU workers); None loads one per process.
        share_model_across_processes: load one model per machine even without
            `model_copies` (large models).
        torch_threads: torch intra-op threads; None keeps torch's default (all
            cores), which oversubscribes a VM running one process per core.
        compile: compile the forward pass with `torch.compile` in the
            background and switch to it once ready (`transforms.compiled`).
        quantize: "int8" quantizes the model's Linear layers to int8 with
            dynamic activation scales (CPU only); "none" keeps the precision.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        top_k: int = 5,
        device: str = "auto",
        precision: str = "fp32",
        batching: BatchSettings | None = None,
        model_copies: int | None = None,
        share_model_across_processes: bool = False,
        torch_threads: int | None = None,
        compile: bool = False,
        quantize: str = "none",
    ) -> None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "fp16" and device == "cpu":
            raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        if model_copies is not None and model_copies < 1:
            raise ValueError("model_copies must be >= 1")
        if torch_threads is not None and torch_threads < 1:
            raise ValueError("torch_threads must be >= 1")
        check_quantize(quantize, device, precision)
        batching = batching or batch_settings(batch_size=None, on_gpu=device == "cuda")
        super().__init__(
            **batching.as_kwargs(),
            large_model=share_model_across_processes,
            model_copies=model_copies,
        )
        self._spec = spec
        self._top_k = top_k
        self._device = device
        self._precision = precision
        self._torch_threads = torch_threads
        self._compile = compile
        self._quantize = quantize
        self._batch_size = batching.max_batch_size

    # -- loading -------------------------------------------------------------

    def cache_key(self) -> str:
        """Identifies what `load_model` builds (for preloading)."""
        return repr((type(self).__name__, sorted(vars(self).items(), key=lambda kv: kv[0])))

    def preload(self) -> None:
        """Start loading the model in the background (local in-process runs).

        Not for a model shared across processes: RunInference loads that one in
        a server process of its own, so a copy loaded here would go unused.
        """
        if self.share_model_across_processes():
            return
        start_preload(self.cache_key(), self._load)

    def load_model(self) -> LoadedT:
        preloaded = take_preloaded(self.cache_key())
        return preloaded if preloaded is not None else self._load()

    def _torch_setup(self) -> tuple[str, Any]:
        """Quiet progress bars, apply torch_threads; the resolved device and dtype."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if self._torch_threads:
            import torch

            torch.set_num_threads(self._torch_threads)
        return resolve_device(self._device), torch_dtype(self._precision)

    def _load(self) -> LoadedT:
        raise NotImplementedError

    def _optimize(self, model: Any, device: str) -> Any:
        """Apply `quantize` to a loaded model (in eval mode, on its device)."""
        if self._quantize == "none":
            return model
        if device != "cpu":
            raise ValueError(f"quantize={self._quantize!r} runs on CPU only, not on {device}")
        return quantize_int8(model)

    def _forward_fn(self, fn: Callable[[Any], Any]) -> CompiledForward:
        """The batch forward function, compiled in the background if `compile`."""
        return CompiledForward(fn, batch_size=self._batch_size, enabled=self._compile)

    # -- inference -----------------------------------------------------------

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: LoadedT,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[Prediction | RowError]:
        return isolate_failures(batch, lambda examples: self._predict_fitting(examples, model))

    def _predict_fitting(self, batch: Sequence[np.ndarray], model: Any) -> list[Prediction]:
        """`_predict`, halving the batch on out-of-memory until it fits.

        A GPU that runs out of memory on a batch (a large model, large inputs,
        another process on the device) must not fail the job: the halves are
        run one after the other, down to single images. Other errors go to
        `isolate_failures`.
        """
        try:
            return self._predict(batch, model)
        except Exception as e:
            if len(batch) == 1 or not is_out_of_memory(e):
                raise
            release_cached_memory()
            half = len(batch) // 2
            logger.warning("Out of memory on a batch of %d; retrying in halves", len(batch))
            return self._predict_fitting(batch[:half], model) + self._predict_fitting(
                batch[half:], model
            )

    def _predict(self, batch: Sequence[np.ndarray], model: Any) -> list[Prediction]:
        """Forward pass, the model family's score function, top-k labels.

        One call of the loaded model (`model(batch, top_k)`, see `to_predictions`):
        with `model_copies` or `share_model_across_processes`, `model` is a
        proxy of a model living in another process, and a proxy passes calls,
        not attribute reads. So the whole prediction runs where the model is,
        and only the batch and the `Prediction`s cross over.
        """
        return list(model(batch, self._top_k))

    @staticmethod
    def forward(batch: Sequence[np.ndarray], model: Any) -> np.ndarray:
        """The hot path: one batch in, float32 logits (batch, labels) out."""
        raise NotImplementedError

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        # Beam's default pickles the whole batch just to measure it.
        return int(sum(example.nbytes for example in batch))

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE
