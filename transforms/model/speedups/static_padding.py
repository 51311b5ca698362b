"""Static padding for convolution layers that pad TensorFlow-style on every call.

transformers' MobileNetV1 and MobileNetV2 with `tf_padding=True` (their default,
and what Google's checkpoints use) call `F.pad` in front of every convolution,
1x1 convolutions included: a full copy of the activation before each of the
~50 convolutions, which on 2 CPU cores costs about as much as a third of the
convolutions themselves. For stride 1 and an odd kernel, TensorFlow's "SAME"
padding is (k - 1) / 2 zeros on every side whatever the input size, which is
exactly what the convolution's own `padding` does without the copy. Those
layers get that padding and a config of their own with `tf_padding=False`, so
transformers' own forward runs unchanged; strided layers, whose "SAME" padding
is uneven and depends on the input size, keep `F.pad`.

As with batch-norm folding, the changed model is checked against the original
on one input (`batchnorm.difference`); any difference beyond float rounding
puts everything back.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

from transforms.model.speedups.batchnorm import difference

logger = logging.getLogger(__name__)

#: transformers layers whose forward is `apply_tf_padding` (if config.tf_padding),
#: then `self.convolution`, normalization and activation.
TF_PADDING_LAYERS = ("MobileNetV1ConvLayer", "MobileNetV2ConvLayer")


def _static_padding(layer: Any) -> tuple[int, ...] | None:
    """The zero padding equal to `layer`'s TF "SAME" padding, or None if it has none."""
    import torch

    if type(layer).__name__ not in TF_PADDING_LAYERS:
        return None
    config = getattr(layer, "config", None)
    conv = getattr(layer, "convolution", None)
    if not getattr(config, "tf_padding", False) or not isinstance(conv, torch.nn.Conv2d):
        return None
    if conv.padding_mode != "zeros" or any(p != 0 for p in conv.padding):
        return None  # padded some other way already
    if any(s != 1 for s in conv.stride) or any(k % 2 == 0 for k in conv.kernel_size):
        return None
    return tuple((k - 1) // 2 * d for k, d in zip(conv.kernel_size, conv.dilation, strict=True))


def make_tf_padding_static(model: Any, run: Callable[[Any], Any], example: Any) -> int:
    """Give stride-1 TF-padded convolution layers static padding, in place.

    Args:
        model: a model in eval mode.
        run: calls the model on an input and returns its output tensor (logits).
        example: an input `run` accepts (one random image of the model's size).

    Returns:
        How many layers changed; 0 if none could, if the model does not run
        on `example`, or if the changed model did not match the original on
        it (nothing changes then).
    """
    import torch

    layers = [(m, pad) for m in model.modules() if (pad := _static_padding(m)) is not None]
    if not layers:
        return 0
    try:
        with torch.no_grad():
            expected = run(example)
    except Exception as e:  # e.g. a model that needs another input size
        shape = tuple(getattr(example, "shape", ()))
        logger.info("Not changing TF padding: the model did not run on %s: %s", shape, e)
        return 0
    changed: list[tuple[Any, Any, Any]] = []  # (layer, its config, its conv's padding)
    try:
        for layer, padding in layers:
            changed.append((layer, layer.config, layer.convolution.padding))
            own = copy.copy(layer.config)  # the model's config object stays as it is
            own.tf_padding = False
            layer.config = own
            layer.convolution.padding = padding
        with torch.no_grad():
            problem = difference(expected, run(example), "the model with static padding")
    except Exception as e:  # an optimization must never cost the model
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        for layer, config, padding in reversed(changed):
            layer.config = config
            layer.convolution.padding = padding
        logger.warning("Not changing TF padding: %s", problem)
        return 0
    return len(layers)
