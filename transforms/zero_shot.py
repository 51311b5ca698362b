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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from transforms.compiled import CompiledForward
from transforms.handler_base import TorchHandlerBase, batch_to_device, to_predictions
from transforms.models import ModelSpec, explain_load_error, from_pretrained_kwargs, resolve_model
from transforms.postprocess import ClassificationFunction
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
    #: pixel_values -> image embeddings: the image tower, or its compiled twin once ready.
    image_features: CompiledForward

    def __call__(self, batch: Sequence[np.ndarray], top_k: int) -> list[Prediction]:
        """The whole prediction for a batch, run where the model lives."""
        logits = ZeroShotModelHandler.forward(batch, self)
        return to_predictions(logits, self.function, self.id2label, top_k)


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


class ZeroShotModelHandler(TorchHandlerBase[LoadedZeroShot]):
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
        text_batch_size: prompts per text-tower pass while building the bank.
        options: `top_k`, `device`, `precision`, `batching`, `model_copies`,
            `share_model_across_processes`, `torch_threads`, `compile`,
            `quantize`, as documented on
            `TorchHandlerBase` (keyword-only; an unknown one is a TypeError).
    """

    def __init__(
        self,
        spec: ModelSpec,
        label_set: LabelSet,
        *,
        text_batch_size: int = TEXT_BATCH_SIZE,
        **options: Any,
    ) -> None:
        if text_batch_size < 1:
            raise ValueError("text_batch_size must be >= 1")
        super().__init__(spec, **options)
        self._label_set = label_set
        self._text_batch_size = text_batch_size

    def _load(self) -> LoadedZeroShot:
        from transformers import AutoModel, AutoTokenizer

        device, dtype = self._torch_setup()
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
        # After the bank: the label embeddings stay exact, only the image tower is quantized.
        model = self._optimize(model, device)
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
            image_features=self._forward_fn(
                lambda x: _features(model.get_image_features(pixel_values=x))
            ),
        )

    @staticmethod
    def forward(batch: Sequence[np.ndarray], model: LoadedZeroShot) -> np.ndarray:
        """The hot path: image tower, normalize, one product with the label bank."""
        import torch

        with torch.inference_mode():
            pixel_values = batch_to_device(batch, model.device, model.dtype)
            embeds = model.image_features(pixel_values).float()
            embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True)
            logits = (embeds @ model.text_bank.T) * model.logit_scale + model.logit_bias
        return np.asarray(logits.cpu().numpy())


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
