"""Zero-shot image classification (CLIP and SigLIP families) with a label bank.

`transformers.ZeroShotImageClassificationPipeline` tokenizes every candidate
label and runs the text tower again on every image. For a batch job with a
fixed taxonomy that is almost all of the work. This handler encodes all
labels x templates once per model load (batched, L2-normalized, kept on the
model's device), and per inference batch runs only the image tower and one
matrix product:

    logits = logit_scale.exp() * img_emb @ text_embᵀ (+ logit_bias for SigLIP)

Scores follow transformers: softmax over the labels for CLIP-like models,
sigmoid per label for SigLIP-like models.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from transforms.batching import BatchSettings, batch_settings
from transforms.errors import RowError
from transforms.image_classification import (
    DEVICES,
    METRICS_NAMESPACE,
    PRECISIONS,
    resolve_device,
    torch_dtype,
)
from transforms.inference import isolate_failures, start_preload, take_preloaded
from transforms.models import ModelSpec, explain_load_error, from_pretrained_kwargs, resolve_model
from transforms.postprocess import ClassificationFunction, apply_function, top_k_predictions
from transforms.rows import Prediction

logger = logging.getLogger(__name__)

DEFAULT_HYPOTHESIS_TEMPLATE = "This is a photo of {}."
#: Prompts encoded per text-tower forward pass while building the label bank.
TEXT_BATCH_SIZE = 256


class LabelSetError(ValueError):
    """Candidate labels or templates that cannot be used; the message says which."""


@dataclass(frozen=True)
class LabelSet:
    """Candidate labels and the hypothesis templates that turn them into prompts.

    With several templates, the label's text embedding is the mean of its
    normalized per-template embeddings, normalized again (prompt ensembling, as
    in the CLIP paper's ImageNet evaluation).
    """

    labels: tuple[str, ...]
    templates: tuple[str, ...] = (DEFAULT_HYPOTHESIS_TEMPLATE,)

    def __post_init__(self) -> None:
        if not self.labels:
            raise LabelSetError(
                "zero-shot classification needs candidate labels: pass --candidate-labels "
                "or --candidate-labels-file"
            )
        empty = [i for i, label in enumerate(self.labels) if not label.strip()]
        if empty:
            raise LabelSetError(f"candidate label(s) at position(s) {empty} are empty")
        seen: dict[str, int] = {}
        duplicates: list[str] = []
        for label in self.labels:
            seen[label] = seen.get(label, 0) + 1
            if seen[label] == 2:
                duplicates.append(label)
        if duplicates:
            raise LabelSetError(f"duplicate candidate label(s): {duplicates}")
        if not self.templates:
            raise LabelSetError("at least one hypothesis template is needed")
        for template in self.templates:
            if "{}" not in template:
                raise LabelSetError(
                    f"hypothesis template {template!r} has no '{{}}' where the label goes"
                )

    def digest(self) -> str:
        """A short hash of the label list (and templates), for metadata and resume."""
        payload = json.dumps([list(self.labels), list(self.templates)], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def prompts(self, template: str) -> list[str]:
        return [template.format(label) for label in self.labels]


def is_sigmoid_family(model_type: str) -> bool:
    """SigLIP-like models score each label independently (as transformers does)."""
    return "siglip" in model_type


def tokenizer_kwargs(model_type: str) -> dict[str, Any]:
    """Text padding as in transformers' pipeline: SigLIP pads to 64 tokens."""
    if is_sigmoid_family(model_type):
        return {"padding": "max_length", "max_length": 64, "truncation": True}
    return {"padding": True, "truncation": True}


def _features(output: Any) -> Any:
    """`get_*_features` returns a tensor (transformers 4) or an output object (5)."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


@dataclass
class LoadedZeroShot:
    """A loaded dual-encoder model with its label bank on the model's device."""

    model: Any
    device: str
    dtype: Any
    text_bank: Any  # (num_labels, dim) float32 tensor, L2-normalized
    logit_scale: float
    logit_bias: float
    function: ClassificationFunction
    id2label: dict[int, str]


def encode_label_bank(
    model: Any, tokenizer: Any, label_set: LabelSet, device: str, text_batch_size: int
) -> Any:
    """Encode labels x templates once: the (num_labels, dim) normalized text bank.

    Prompts are encoded in chunks of `text_batch_size`, so memory stays bounded
    for 10,000+ labels. Where padding is to the longest prompt of a chunk (CLIP),
    prompts are sorted by token length first, so chunks carry little padding;
    each prompt's attention mask makes its embedding independent of the chunk.
    """
    import torch

    kwargs = tokenizer_kwargs(model.config.model_type)
    pad_to_longest = kwargs.get("padding") is True
    bank = None
    for template in label_set.templates:
        prompts = label_set.prompts(template)
        order = list(range(len(prompts)))
        if pad_to_longest and len(prompts) > text_batch_size:
            lengths = [len(ids) for ids in tokenizer(prompts, truncation=True)["input_ids"]]
            order.sort(key=lengths.__getitem__)
        per_template = None
        for start in range(0, len(order), text_batch_size):
            index = order[start : start + text_batch_size]
            tokens = tokenizer([prompts[i] for i in index], return_tensors="pt", **kwargs).to(
                device
            )
            with torch.inference_mode():
                embeds = _features(model.get_text_features(**tokens)).float()
            embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True)
            if per_template is None:
                per_template = embeds.new_empty((len(prompts), embeds.shape[-1]))
            per_template[torch.tensor(index, device=embeds.device)] = embeds
        bank = per_template if bank is None else bank + per_template
    assert bank is not None
    if len(label_set.templates) > 1:
        bank = bank / bank.norm(p=2, dim=-1, keepdim=True)
    return bank


class ZeroShotModelHandler(ModelHandler[np.ndarray, "Prediction | RowError", LoadedZeroShot]):
    """Zero-shot image classification against a fixed label set, for RunInference.

    Examples are preprocessed `pixel_values` (C, H, W) from `ImagePreprocessor`.
    `load_model` loads `AutoModel` and its tokenizer and encodes the label bank;
    `run_inference` runs only the image tower.

    Example::

        labels = LabelSet(("cat", "dog", "car"))
        handler = ZeroShotModelHandler(ModelSpec("path/to/clip"), labels, top_k=2)
        results = keyed_pixel_values | RunInference(KeyedModelHandler(handler))

    Args:
        spec: a CLIP- or SigLIP-family model.
        label_set: candidate labels and hypothesis templates.
        top_k: labels kept per image (capped at the label count); 0 keeps all.
        device, precision, batching, model_copies, share_model_across_processes:
            as for `ImageClassificationModelHandler`.
        text_batch_size: prompts per text-tower pass while building the bank.
    """

    def __init__(
        self,
        spec: ModelSpec,
        label_set: LabelSet,
        *,
        top_k: int = 5,
        device: str = "auto",
        precision: str = "fp32",
        batching: BatchSettings | None = None,
        model_copies: int | None = None,
        share_model_across_processes: bool = False,
        torch_threads: int | None = None,
        text_batch_size: int = TEXT_BATCH_SIZE,
    ) -> None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "fp16" and device == "cpu":
            raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        if text_batch_size < 1:
            raise ValueError("text_batch_size must be >= 1")
        batching = batching or batch_settings(batch_size=None, on_gpu=device == "cuda")
        super().__init__(
            **batching.as_kwargs(),
            large_model=share_model_across_processes,
            model_copies=model_copies,
        )
        self._spec = spec
        self._label_set = label_set
        self._top_k = top_k
        self._device = device
        self._precision = precision
        self._torch_threads = torch_threads
        self._text_batch_size = text_batch_size

    def cache_key(self) -> str:
        """Identifies what `load_model` builds (for preloading)."""
        return repr((type(self).__name__, sorted(vars(self).items(), key=lambda kv: kv[0])))

    def preload(self) -> None:
        """Start loading the model in the background (local in-process runs)."""
        start_preload(self.cache_key(), self._load)

    def load_model(self) -> LoadedZeroShot:
        preloaded = take_preloaded(self.cache_key())
        return preloaded if preloaded is not None else self._load()

    def _load(self) -> LoadedZeroShot:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if self._torch_threads:
            import torch

            torch.set_num_threads(self._torch_threads)
        device = resolve_device(self._device)
        dtype = torch_dtype(self._precision)
        path = resolve_model(self._spec)
        kwargs = from_pretrained_kwargs(self._spec)
        try:
            model = AutoModel.from_pretrained(path, dtype=dtype, **kwargs)
            kwargs.pop("use_safetensors", None)
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        except Exception as e:
            raise explain_load_error(self._spec, e) from e
        check_dual_encoder(model, self._spec.model)
        model.eval().to(device)
        bank = encode_label_bank(model, tokenizer, self._label_set, device, self._text_batch_size)
        model_type = model.config.model_type
        bias = getattr(model, "logit_bias", None)
        logger.info(
            "Encoded a label bank of %d labels x %d templates",
            len(self._label_set.labels),
            len(self._label_set.templates),
        )
        return LoadedZeroShot(
            model=model,
            device=device,
            dtype=dtype,
            text_bank=bank,
            logit_scale=float(model.logit_scale.detach().float().exp().item()),
            logit_bias=float(bias.detach().float().item()) if bias is not None else 0.0,
            function=(
                ClassificationFunction.SIGMOID
                if is_sigmoid_family(model_type)
                else ClassificationFunction.SOFTMAX
            ),
            id2label=dict(enumerate(self._label_set.labels)),
        )

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: LoadedZeroShot,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[Prediction | RowError]:
        return isolate_failures(batch, lambda examples: self._predict(examples, model))

    def _predict(self, batch: Sequence[np.ndarray], model: LoadedZeroShot) -> list[Prediction]:
        logits = self.forward(batch, model)
        scores = apply_function(logits, model.function)
        return top_k_predictions(scores, model.id2label, self._top_k)

    @staticmethod
    def forward(batch: Sequence[np.ndarray], model: LoadedZeroShot) -> np.ndarray:
        """The hot path: image tower, normalize, one product with the label bank."""
        import torch

        pixel_values = torch.from_numpy(np.stack(batch))
        with torch.inference_mode():
            pixel_values = pixel_values.to(model.device, dtype=model.dtype)
            embeds = _features(model.model.get_image_features(pixel_values=pixel_values)).float()
            embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True)
            logits = (embeds @ model.text_bank.T) * model.logit_scale + model.logit_bias
        return np.asarray(logits.cpu().numpy())

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return int(sum(example.nbytes for example in batch))

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE


def check_dual_encoder(model: Any, name: str) -> None:
    """Zero-shot needs separate image and text towers (CLIP, SigLIP, ...)."""
    missing = [
        attr
        for attr in ("get_image_features", "get_text_features", "logit_scale")
        if not hasattr(model, attr)
    ]
    if missing:
        raise ValueError(
            f"model {name!r} ({type(model).__name__}) has no image/text towers "
            f"(missing {missing}); zero-shot classification needs a CLIP- or SigLIP-family model"
        )
