"""A torch-only RunInference ModelHandler for `AutoModelForImageClassification`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from transforms.batching import BatchSettings, batch_settings
from transforms.errors import RowError
from transforms.inference import isolate_failures, start_preload, take_preloaded
from transforms.models import ModelSpec, explain_load_error, from_pretrained_kwargs, resolve_model
from transforms.postprocess import (
    ClassificationFunction,
    apply_function,
    resolve_function,
    top_k_predictions,
)
from transforms.rows import Prediction

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
METRICS_NAMESPACE = "image_labeler"


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


def preferred_memory_format(model: Any) -> Any:
    """channels_last for convolutional models, None (as loaded) for the rest.

    oneDNN and cuDNN run convolutions in NHWC without layout conversions; a
    MobileNetV2 forward on 2 CPU cores goes from ~33 to ~65 images/s.
    Transformers (ViT, CLIP) gain nothing, so they are left alone.
    """
    import torch

    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        convs = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        if convs > 4:  # more than a patch-embedding stem
            return torch.channels_last
    return None


@dataclass
class LoadedClassifier:
    """A loaded model plus what postprocessing needs from its config."""

    model: Any
    device: str
    dtype: Any
    id2label: dict[int, str]
    function: ClassificationFunction
    memory_format: Any = None  # torch.channels_last for convolutional models


class ImageClassificationModelHandler(
    ModelHandler[np.ndarray, "Prediction | RowError", LoadedClassifier]
):
    """Runs `AutoModelForImageClassification` on batches of preprocessed images.

    Examples are float32 `pixel_values` arrays (C, H, W) made by
    `ImagePreprocessor` on the decode workers. Each result is a `Prediction`
    (top-k labels and scores, best first), or a `RowError` for an image whose
    inference failed: a failing batch is retried one image at a time, so one
    bad image never fails its neighbours or the job.

    Example::

        handler = ImageClassificationModelHandler(ModelSpec("path/to/model"), top_k=3)
        keyed = KeyedModelHandler(handler)
        results = keyed_pixel_values | RunInference(keyed)

    Args:
        spec: which model to load.
        top_k: labels kept per image (capped at the model's label count); 0 keeps all.
        function_to_apply: "default", "softmax", "sigmoid" or "none".
        device: "auto", "cpu" or "cuda".
        precision: "fp32", "fp16" or "bf16" (fp16 needs a GPU).
        batching: BatchElements settings (`transforms.batching.batch_settings`).
        model_copies: models loaded per worker machine, shared across its
            processes (GPU workers); None loads one per process.
        share_model_across_processes: load one model per machine even without
            `model_copies` (large models).
        torch_threads: torch intra-op threads; None keeps torch's default (all
            cores), which oversubscribes a VM running one process per core.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        top_k: int = 5,
        function_to_apply: str = "default",
        device: str = "auto",
        precision: str = "fp32",
        batching: BatchSettings | None = None,
        model_copies: int | None = None,
        share_model_across_processes: bool = False,
        torch_threads: int | None = None,
    ) -> None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        ClassificationFunction(function_to_apply)  # raises on a bad value
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "fp16" and device == "cpu":
            raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        if model_copies is not None and model_copies < 1:
            raise ValueError("model_copies must be >= 1")
        batching = batching or batch_settings(batch_size=None, on_gpu=device == "cuda")
        super().__init__(
            **batching.as_kwargs(),
            large_model=share_model_across_processes,
            model_copies=model_copies,
        )
        self._spec = spec
        self._top_k = top_k
        self._function = function_to_apply
        self._device = device
        self._precision = precision
        self._torch_threads = torch_threads

    def cache_key(self) -> str:
        """Identifies what `load_model` builds (for preloading)."""
        return repr((type(self).__name__, sorted(vars(self).items(), key=lambda kv: kv[0])))

    def preload(self) -> None:
        """Start loading the model in the background (local in-process runs)."""
        start_preload(self.cache_key(), self._load)

    def load_model(self) -> LoadedClassifier:
        preloaded = take_preloaded(self.cache_key())
        return preloaded if preloaded is not None else self._load()

    def _load(self) -> LoadedClassifier:
        from transformers import AutoModelForImageClassification
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if self._torch_threads:
            import torch

            torch.set_num_threads(self._torch_threads)
        device = resolve_device(self._device)
        dtype = torch_dtype(self._precision)
        try:
            model = AutoModelForImageClassification.from_pretrained(
                resolve_model(self._spec), dtype=dtype, **from_pretrained_kwargs(self._spec)
            )
        except Exception as e:
            raise explain_load_error(self._spec, e) from e
        model.eval().to(device)
        memory_format = preferred_memory_format(model)
        if memory_format is not None:
            model.to(memory_format=memory_format)
        config = model.config
        id2label = {int(k): str(v) for k, v in config.id2label.items()}
        return LoadedClassifier(
            model=model,
            device=device,
            dtype=dtype,
            id2label=id2label,
            function=resolve_function(self._function, config),
            memory_format=memory_format,
        )

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: LoadedClassifier,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[Prediction | RowError]:
        return isolate_failures(batch, lambda examples: self._predict(examples, model))

    def _predict(self, batch: Sequence[np.ndarray], model: LoadedClassifier) -> list[Prediction]:
        logits = self.forward(batch, model)
        scores = apply_function(logits, model.function)
        return top_k_predictions(scores, model.id2label, self._top_k)

    @staticmethod
    def forward(batch: Sequence[np.ndarray], model: LoadedClassifier) -> np.ndarray:
        """The hot path: stack, one forward pass, float32 logits back on the host."""
        import torch

        pixel_values = torch.from_numpy(np.stack(batch))
        with torch.inference_mode():
            pixel_values = pixel_values.to(model.device, dtype=model.dtype)
            if model.memory_format is not None:
                pixel_values = pixel_values.contiguous(memory_format=model.memory_format)
            logits = model.model(pixel_values=pixel_values).logits
        return np.asarray(logits.float().cpu().numpy())

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        # Beam's default pickles the whole batch just to measure it.
        return int(sum(example.nbytes for example in batch))

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE
