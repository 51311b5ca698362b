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
from transforms.metrics import METRICS_NAMESPACE
from transforms.model.batching import forward_batch_size
from transforms.model.device import (
    check_device_support,
    is_out_of_memory,
    release_cached_memory,
    resolve_device,
    torch_dtype,
)
from transforms.model.inference import isolate_failures
from transforms.model.pixels import Normalization, checked_split
from transforms.model.postprocess import ClassificationFunction, apply_function, top_k_predictions
from transforms.model.preload import Preload
from transforms.model.preprocess import load_image_processor
from transforms.model.settings import HandlerSettings
from transforms.model.speedups.compiled import CompiledForward
from transforms.model.speedups.quantize import quantize_int8
from transforms.rows import Prediction

logger = logging.getLogger(__name__)

LoadedT = TypeVar("LoadedT")


class TorchHandlerBase(
    ModelHandler[np.ndarray, "Prediction | RowError", LoadedT], Generic[LoadedT]
):
    """Base of the image-classification and zero-shot handlers.

    A handler is built from `HandlerSettings` (`LabelingSpec.handler`: its
    options are checked there, once). The loaded model only maps a batch to
    logits; top-k and the score function are postprocessing, applied here
    after the model call (`postprocess`), as Beam's `PredictionResult`
    postprocessing and HF's `postprocess` step do.

    Args:
        settings: the handler's settings.
        id2label: label of each logit column.
        function: the resolved score function.
    """

    def __init__(
        self,
        settings: HandlerSettings,
        *,
        id2label: dict[int, str],
        function: ClassificationFunction,
    ) -> None:
        super().__init__(
            **settings.batching.as_kwargs(),
            large_model=settings.share_model_across_processes,
            model_copies=settings.model_copies,
        )
        self.settings = settings
        self._id2label = id2label
        self._function = function
        self._preloaded: Preload[LoadedT] = Preload()
        self._chunk: int | None = None  # see _forward_batch_size

    # -- loading -------------------------------------------------------------

    def preload(self, weights: Any = None) -> None:
        """Start loading the model in the background (local in-process runs).

        Args:
            weights: the model `transforms.resolve.resolve_loaded` already
                loaded to check it; it is prepared instead of read again.

        Not for a model shared across processes: RunInference loads that one in
        a server process of its own, so a copy loaded here would go unused.
        """
        if self.share_model_across_processes():
            return
        self._preloaded.start(lambda: self._load(weights))

    def load_model(self) -> LoadedT:
        preloaded = self._preloaded.take()
        return preloaded if preloaded is not None else self._load()

    def _torch_setup(self) -> tuple[str, Any]:
        """Quiet progress bars, apply torch_threads; the resolved device and dtype.

        On a worker, "auto" is resolved here; a precision or quantization that
        the device cannot run fails the load (the same check as `resolve`).
        """
        from transformers.utils import logging as hf_logging

        settings = self.settings
        if settings.tune_malloc:
            tune_malloc()
        hf_logging.disable_progress_bar()
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device)
        check_device_support(device, settings.precision, settings.quantize)
        return device, torch_dtype(settings.precision)

    def _normalization(self) -> Normalization | None:
        """What to apply to the uint8 pixels `ImagePreprocessor` sends for this
        model (the same check of the same processor, so both sides agree);
        None when it sends float32 `pixel_values`."""
        split = checked_split(load_image_processor(self.settings.model))
        return split.normalization if split is not None else None

    def _load(self, weights: Any = None) -> LoadedT:
        """Load (or, given `weights`, prepare) the model on this worker."""
        raise NotImplementedError

    def _optimize(self, model: Any, device: str) -> Any:
        """Apply `quantize` to a loaded model (in eval mode, on its device)."""
        if self.settings.quantize == "none":  # check_device_support refused it off the CPU
            return model
        return quantize_int8(model)

    def _forward_fn(self, fn: Callable[[Any], Any]) -> CompiledForward:
        """The batch forward function, compiled in the background if `compile`.

        `IMAGE_LABELER_COMPILE_BLOCKING=1` compiles on the first full batch
        instead, so a short run (a test) really runs compiled batches.
        """
        blocking = os.environ.get("IMAGE_LABELER_COMPILE_BLOCKING") == "1"
        return CompiledForward(
            fn,
            batch_size=self._forward_batch_size(),
            enabled=self.settings.compile,
            background=not blocking,
        )

    # -- inference -----------------------------------------------------------

    def _forward_batch_size(self) -> int:
        """Images per forward pass on the device this process resolves to: with
        "auto" on remote workers, BatchElements' batches are sized for a GPU and
        a CPU worker runs them in CPU-sized passes."""
        if self._chunk is None:
            device = resolve_device(self.settings.device)
            self._chunk = forward_batch_size(self.settings.batch_size, device)
        return self._chunk

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: LoadedT,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[Prediction | RowError]:
        size = self._forward_batch_size()
        results: list[Prediction | RowError] = []
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            results += isolate_failures(
                chunk, lambda examples: self._predict_fitting(examples, model)
            )
        return results

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
            self.settings.top_k,
            threshold=self.settings.threshold,
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
