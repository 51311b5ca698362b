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

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from transforms.model.device import batch_to_device
from transforms.model.handler_base import TorchHandlerBase
from transforms.model.label_set import LabelSet, is_sigmoid_family
from transforms.model.loading import (
    explain_load_error,
    from_pretrained_kwargs,
    load_pretrained,
    model_facts,
    resolve_model,
)
from transforms.model.pixels import Normalization
from transforms.model.postprocess import ClassificationFunction
from transforms.model.settings import HandlerSettings
from transforms.model.speedups.compiled import CompiledForward

logger = logging.getLogger(__name__)

#: Prompts encoded per text-tower forward pass while building the label bank.
TEXT_BATCH_SIZE = 256


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
    #: pixel_values -> image embeddings: the image tower, or its compiled twin once ready.
    image_features: CompiledForward
    #: Also return the normalized image embeddings (`--embeddings`).
    embeddings: bool = False
    #: Rescale and normalize of uint8 pixels (`transforms.model.pixels`).
    normalization: Normalization | None = None

    def __call__(self, batch: Sequence[np.ndarray]) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """A batch's logits over the labels (and embeddings), computed where the model lives."""
        return ZeroShotModelHandler.forward(batch, self)


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
    `run_inference` runs only the image tower and one product with the bank.

    Example::

        spec = LabelingSpec(model="path/to/clip", candidate_labels=("cat", "dog"), top_k=2)
        handler = ZeroShotModelHandler(resolve(spec, local=True).handler)
        results = keyed_pixel_values | RunInference(KeyedModelHandler(handler))

    Args:
        settings: the handler's settings, with the label set (`resolve` reads
            a label file).
        text_batch_size: prompts per text-tower pass while building the bank.
    """

    def __init__(
        self, settings: HandlerSettings, *, text_batch_size: int = TEXT_BATCH_SIZE
    ) -> None:
        if text_batch_size < 1:
            raise ValueError("text_batch_size must be >= 1")
        if settings.labels is None:
            raise ValueError("zero-shot classification needs a label set")
        label_set = settings.labels
        sigmoid = is_sigmoid_family(model_facts(settings.model).model_type)
        super().__init__(
            settings,
            id2label=dict(enumerate(label_set.labels)),
            function=ClassificationFunction.SIGMOID if sigmoid else ClassificationFunction.SOFTMAX,
        )
        self._label_set = label_set
        self._text_batch_size = text_batch_size

    def _load(self, weights: Any = None) -> LoadedZeroShot:
        from transformers import AutoTokenizer

        device, dtype = self._torch_setup()
        spec = self.settings.model
        model = (
            weights
            if weights is not None
            else load_pretrained(spec, zero_shot=True, precision=self.settings.precision)
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                resolve_model(spec), **from_pretrained_kwargs(spec)
            )
        except Exception as e:
            raise explain_load_error(spec, e) from e
        check_dual_encoder(model, spec.model)
        model.eval().to(device)
        bank = encode_label_bank(model, tokenizer, self._label_set, device, self._text_batch_size)
        # After the bank: the label embeddings stay exact, only the image tower is quantized.
        model = self._optimize(model, device)
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
            image_features=self._forward_fn(
                lambda x: _features(model.get_image_features(pixel_values=x))
            ),
            embeddings=self.settings.embeddings,
            normalization=self._normalization(),
        )

    @staticmethod
    def forward(
        batch: Sequence[np.ndarray], model: LoadedZeroShot
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The hot path: image tower, normalize, one product with the label bank
        (and the normalized image embeddings when `model.embeddings`)."""
        import torch

        with torch.inference_mode():
            pixel_values = batch_to_device(batch, model.device, model.dtype, model.normalization)
            embeds = model.image_features(pixel_values).float()
            embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True)
            logits = (embeds @ model.text_bank.T) * model.logit_scale + model.logit_bias
        if model.embeddings:
            return np.asarray(logits.cpu().numpy()), np.asarray(embeds.cpu().numpy())
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
