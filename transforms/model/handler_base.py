"""What our torch ModelHandlers share.

RunInference owns batching, model sharing and metrics; a handler only loads
its model and runs one batch. The base class holds the rest, once: option
checks at construction, BatchElements settings, model sharing for GPU
workers, torch threads, preloading for in-process runs, and per-image
isolation of inference failures.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from transforms.allocator import tune_malloc
from transforms.errors import RowError
from transforms.model.inference import isolate_failures, start_preload, take_preloaded
from transforms.model.postprocess import ClassificationFunction, apply_function, top_k_predictions
from transforms.model.speedups.compiled import CompiledForward
from transforms.rows import Prediction
from transforms.spec import LabelingSpec, check_device_support, resolve_device

logger = logging.getLogger(__name__)

METRICS_NAMESPACE = "image_labeler"

LoadedT = TypeVar("LoadedT")


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

    A handler is built from a checked `LabelingSpec` (its options are validated
    there, once). The loaded model only maps a batch to logits; top-k and the
    score function are postprocessing, applied here after the model call
    (`postprocess`), as Beam's `PredictionResult` postprocessing and HF's
    `postprocess` step do.

    Args:
        labeling: the checked spec (model, top_k, device, precision, batching,
            model_copies, share_model_across_processes, torch_threads, compile,
            quantize).
        id2label: label of each logit column.
        function: the resolved score function.
    """

    def __init__(
        self,
        labeling: LabelingSpec,
        *,
        id2label: dict[int, str],
        function: ClassificationFunction,
    ) -> None:
        batching = labeling.batching
        super().__init__(
            **batching.as_kwargs(),
            large_model=labeling.share_model_across_processes,
            model_copies=labeling.model_copies,
        )
        self.labeling = labeling
        self._spec = labeling.model_spec
        self._top_k = labeling.top_k
        self._threshold = labeling.threshold
        self._embeddings = labeling.embeddings
        self._device = labeling.device
        self._precision = labeling.precision
        self._torch_threads = labeling.torch_threads
        self._compile = labeling.compile
        self._quantize = labeling.quantize
        self._batch_size = batching.max_batch_size
        self._id2label = id2label
        self._function = function

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
        """Quiet progress bars, apply torch_threads; the resolved device and dtype.

        On a worker, "auto" is resolved here; a precision or quantization that
        the device cannot run fails the load (the same check as `resolve`).
        """
        from transformers.utils import logging as hf_logging

        if self.labeling.tune_malloc:
            tune_malloc()
        hf_logging.disable_progress_bar()
        if self._torch_threads:
            import torch

            torch.set_num_threads(self._torch_threads)
        device = resolve_device(self._device)
        check_device_support(device, self._precision, self._quantize)
        return device, torch_dtype(self._precision)

    def _load(self) -> LoadedT:
        raise NotImplementedError

    def _optimize(self, model: Any, device: str) -> Any:
        """Apply `quantize` to a loaded model (in eval mode, on its device)."""
        if self._quantize == "none":  # check_device_support refused it off the CPU
            return model
        return quantize_int8(model)

    def _forward_fn(self, fn: Callable[[Any], Any]) -> CompiledForward:
        """The batch forward function, compiled in the background if `compile`.

        `IMAGE_LABELER_COMPILE_BLOCKING=1` compiles on the first full batch
        instead, so a short run (a test) really runs compiled batches.
        """
        blocking = os.environ.get("IMAGE_LABELER_COMPILE_BLOCKING") == "1"
        return CompiledForward(
            fn, batch_size=self._batch_size, enabled=self._compile, background=not blocking
        )

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
        """One call of the loaded model (batch in, logits out), then postprocess.

        With `model_copies` or `share_model_across_processes`, `model` is a
        proxy of a model living in another process, and a proxy passes calls,
        not attribute reads: only the batch and the logits cross over.
        """
        return self.postprocess(model(batch))

    def postprocess(self, output: np.ndarray | tuple[np.ndarray, np.ndarray]) -> list[Prediction]:
        """Score function and labels of a batch's logits, best first: the top k,
        or with a threshold the labels scoring at least it. The output is the
        logits, or (logits, embeddings) with `embeddings`."""
        logits, embeddings = output if isinstance(output, tuple) else (output, None)
        return top_k_predictions(
            apply_function(logits, self._function),
            self._id2label,
            self._top_k,
            threshold=self._threshold,
            embeddings=embeddings,
        )

    @staticmethod
    def forward(
        batch: Sequence[np.ndarray], model: Any
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The hot path: one batch in, float32 logits (batch, labels) out, with
        the L2-normalized float32 embeddings (batch, dim) when the model has
        `embeddings` set."""
        raise NotImplementedError

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        # Beam's default pickles the whole batch just to measure it.
        return int(sum(example.nbytes for example in batch))

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE
