"""The device a model runs on: which one, at which precision, and its memory.

`resolve_device` and `check_device_support` are the one check for a device
named by the user, resolved on a local run (`transforms.resolve`), or resolved
on a worker when the model loads (`TorchHandlerBase`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from transforms.model.pixels import Normalization
from transforms.options import ConfigError


def torch_dtype(precision: str) -> Any:
    """The torch dtype of a `--precision` value."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def resolve_device(device: str) -> str:
    """ "auto" means cuda when torch sees a GPU, else cpu.

    Raises:
        ConfigError: cuda was asked for and torch sees no GPU.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but torch sees no CUDA device here; use --device cpu "
            "(or auto), or run on a machine with a GPU"
        )
    return device


def check_device_support(device: str, precision: str, quantize: str) -> None:
    """Refuse a precision or quantization that the device cannot run.

    Raises:
        ConfigError: naming the option.
    """
    if precision == "fp16" and device == "cpu":
        raise ConfigError(
            "--precision fp16 needs a GPU and the device is cpu (--device auto resolves to "
            "cpu without one); use --precision bf16 or fp32 on CPU"
        )
    if quantize != "none" and device != "cpu":
        raise ConfigError(
            f"--quantize {quantize} runs on CPU only, not on {device}; use --precision fp16 "
            "on a GPU"
        )


def batch_to_device(
    batch: Sequence[np.ndarray],
    device: str,
    dtype: Any,
    normalization: Normalization | None,
    memory_format: Any = None,
) -> Any:
    """Stack a batch into one tensor of pixel values on `device`, laid out in
    `memory_format` when one is given (`torch.channels_last` for CNNs).

    uint8 pixels (`transforms.model.pixels`) are copied as they are, a quarter
    of the bytes, and rescaled and normalized there, the whole batch at once.
    The layout is changed on the stacked pixels as they come, before anything
    converts them to float: on uint8 a quarter of the bytes, and no float32
    batch is made only to be copied into another layout. On CUDA the host
    tensor is pinned and copied with `non_blocking=True`, so the copy overlaps
    the work already queued on the GPU; on CPU the stacked array is used in
    place (`torch.from_numpy` shares its memory).

    Raises:
        ValueError: uint8 pixels without a normalization to apply.
    """
    import torch

    tensor = torch.from_numpy(np.stack(batch))
    if memory_format is not None:
        tensor = tensor.contiguous(memory_format=memory_format)
    if device.startswith("cuda"):
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    if tensor.dtype == torch.uint8:
        if normalization is None:
            raise ValueError("uint8 pixels reached a model that has no normalization for them")
        tensor = normalization.apply(tensor)
    return tensor.to(dtype=dtype)


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error."""
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_cached_memory() -> None:
    """Give the allocator's cached GPU blocks back (after an out-of-memory error)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
