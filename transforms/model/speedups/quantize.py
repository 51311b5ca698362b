"""`--quantize int8`: dynamic int8 `nn.Linear` layers on CPU."""

from __future__ import annotations

from typing import Any


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
