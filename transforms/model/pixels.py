"""uint8 pixels from the decode workers; rescale and normalize in the handler.

A model's image processor resizes and crops (the costly, per-image part), then
rescales and normalizes to float32. Done on the decode workers, that sends
602 KB of float32 per 224-px image to the model, through every queue, stack
and (with `--model-copies`) process boundary. Split in two, the workers send
the resized and cropped uint8 pixels (150 KB), and the handler rescales and
normalizes whole batches at once, on the model's device.

The split is checked on probe images when the processor loads: the two halves
must give the processor's own output to 1e-6, or the processor's full output
is used (logged once). Processors it cannot express keep the full output:

- transformers' processors with `do_rescale` and `do_normalize` (ViT, ConvNext,
  CLIP, SigLIP, MobileNet ...): the first half is the processor itself with
  both turned off, the second its own (fused) rescale-and-normalize. For the
  torchvision-backed ones the first half calls the processor's own resize and
  crop (`_preprocess`) on a channels-last view of the decoded pixels
  (`_channels_last_resize_crop`): the same kernels, without the processor's
  per-call validation and its HWC-to-CHW copy of the full-size image, half
  the cost on a 500x375 photo; used only where it gives the processor's
  output exactly, on the probes;
- timm's (`TimmWrapperImageProcessor`, the default model): its transforms up
  to `ToTensor`, then `ToTensor`'s division and `Normalize`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

#: Largest difference from the processor's own output that the split may make.
TOLERANCE = 1e-6

_told: set[str] = set()  # messages already logged in this process (logged once)

#: Each thread's float32 batch on the CPU, reused by its next batch of the same
#: shape and layout. A batch above glibc's largest mmap threshold (32 MiB: 56
#: images at 224 px) is otherwise fresh pages each time, faulted in and zeroed
#: by the kernel: at batch 64, 3,000 photos and a near-free model, steady
#: 0.69 -> 0.80 of the stage limit (5 interleaved rounds).
_float_batches = threading.local()


def _float_batch_like(pixels: Any) -> Any:
    """This thread's float32 CPU tensor shaped and laid out as `pixels` (made
    when the last one differs), for the caller to overwrite."""
    import torch

    key = (tuple(pixels.shape), tuple(pixels.stride()))
    kept = getattr(_float_batches, "kept", None)
    if kept is None or kept[0] != key:
        kept = (key, torch.empty_strided(pixels.shape, pixels.stride(), dtype=torch.float32))
        _float_batches.kept = kept
    return kept[1]


def _once(level: int, message: str) -> None:
    if message not in _told:
        _told.add(message)
        logger.log(level, message)


@dataclass(frozen=True)
class Normalization:
    """The processor's rescale and normalize, for uint8 pixels (B, C, H, W):
    ``(x / divide - mean) / std`` per channel in float32 (no division when
    `divide` is None: transformers fuses the rescale into `mean` and `std`)."""

    divide: float | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, pixels: Any) -> Any:
        """float32 pixel values of a uint8 tensor, on the tensor's device and
        in its memory format. On the CPU, under `torch.inference_mode()`, they
        are written into this thread's reused batch (`_float_batch_like`):
        valid until the thread's next call, which is the next forward pass."""
        import torch

        dense = pixels.is_contiguous() or pixels.is_contiguous(memory_format=torch.channels_last)
        # Only under inference mode, as the forward passes run: a tensor made
        # there cannot be written outside it (the load-time probe check).
        if pixels.device.type == "cpu" and dense and torch.is_inference_mode_enabled():
            values = _float_batch_like(pixels).copy_(pixels)
        else:  # a fresh tensor (on CUDA the caching allocator reuses device memory)
            values = pixels.to(torch.float32)
        if self.divide is not None:
            values.div_(self.divide)  # in place: one float32 batch, not two
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=values.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=values.device).view(shape)
        return values.sub_(mean).div_(std)


@dataclass(frozen=True)
class PixelSplit:
    """A processor in two halves: `resize_crop` (images to uint8 CHW arrays, on
    the decode workers) and `normalization` (in the handler)."""

    resize_crop: Callable[[Sequence[Image.Image]], list[np.ndarray]]
    normalization: Normalization
    #: Whether `resize_crop` calls the processor's resize and crop directly
    #: (`_channels_last_resize_crop`) rather than the processor.
    direct: bool = False


def _timm_split(processor: Any) -> PixelSplit | None:
    import torch

    steps = list(processor.val_transforms.transforms)
    names = [type(step).__name__ for step in steps]
    if len(steps) < 2 or names[-2] not in ("ToTensor", "MaybeToTensor") or names[-1] != "Normalize":
        return None
    head, normalize = steps[:-2], steps[-1]

    def resize_crop(images: Sequence[Image.Image]) -> list[np.ndarray]:
        arrays = []
        for image in images:
            for step in head:
                image = step(image)
            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim != 3:
                raise ValueError(f"timm's transforms gave {array.dtype} {array.shape}")
            arrays.append(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return arrays

    mean = tuple(float(v) for v in torch.as_tensor(normalize.mean).flatten())
    std = tuple(float(v) for v in torch.as_tensor(normalize.std).flatten())
    return PixelSplit(resize_crop, Normalization(255.0, mean, std))


def _uint8(resized: Any) -> Any:
    """The processor's resized pixels, which must still be uint8."""
    import torch

    if resized.dtype != torch.uint8:
        raise ValueError(f"the processor's resize gave {resized.dtype}, not uint8")
    return resized


def _transformers_split(processor: Any) -> PixelSplit | None:
    import torch

    if not (getattr(processor, "do_rescale", False) and getattr(processor, "do_normalize", False)):
        return None

    def through_processor(images: Sequence[Image.Image]) -> list[np.ndarray]:
        out = processor(
            images=list(images), do_rescale=False, do_normalize=False, return_tensors="pt"
        )["pixel_values"]
        return list(np.ascontiguousarray(_uint8(out).numpy()))

    direct = _channels_last_resize_crop(processor, through_processor)

    # As transformers fuses them: mean and std divided by the rescale factor.
    scale = float(processor.rescale_factor)
    mean = torch.tensor(processor.image_mean) * (1.0 / scale)
    std = torch.tensor(processor.image_std) * (1.0 / scale)
    normalization = Normalization(None, tuple(mean.tolist()), tuple(std.tolist()))
    return PixelSplit(direct or through_processor, normalization, direct=direct is not None)


#: What torch says, once per process, of a tensor made on a read-only array
#: (a decoded image's pixels, which are only read).
_READ_ONLY_WARNING = "The given NumPy array is not writable"


def _channels_last_resize_crop(
    processor: Any, through_processor: Callable[[Sequence[Image.Image]], list[np.ndarray]]
) -> Callable[[Sequence[Image.Image]], list[np.ndarray]] | None:
    """A torchvision-backed processor's resize and crop, called directly.

    `processor(images)` validates its arguments on every call, copies each
    decoded image from HWC to CHW (`.contiguous()`: the full-size image), and
    only then calls its `_preprocess` (resize, center crop). Here the
    arguments `_preprocess` receives are captured once, on a probe, and each
    image goes straight to `_preprocess` as a CHW view of its HWC pixels, which
    torch's uint8 resize kernels read as they are. On a 500x375 photo that
    takes the resize and crop from ~0.7 to ~0.35 ms on one core.

    Returns None, so the processor's own call is used, for processors of
    another backend, or when the two differ on the probes by a single value.
    """
    import copy
    import warnings

    import torch

    if getattr(processor, "backend", None) != "torchvision" or not callable(
        getattr(processor, "_preprocess", None)
    ):
        return None
    preprocess = processor._preprocess
    captured: dict[str, Any] = {}

    def capture(images: Any, **kwargs: Any) -> Any:
        captured.update(kwargs)
        return preprocess(images, **kwargs)

    spy = copy.copy(processor)  # the instance attribute shadows the method on the copy only
    spy._preprocess = capture
    # What `_preprocess` was given on a probe, one image per call: never
    # stacked with others (grouping would copy it).
    kwargs: dict[str, Any] = {}

    def resize_crop(images: Sequence[Image.Image]) -> list[np.ndarray]:
        arrays: list[np.ndarray] = []
        for image in images:
            if image.mode != "RGB":
                arrays += through_processor([image])
                continue
            pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)
            result = preprocess([pixels], **kwargs)
            # A BatchFeature, or the list of images (MobileNetV2's `_preprocess`).
            (out,) = result["pixel_values"] if isinstance(result, Mapping) else result
            arrays.append(np.ascontiguousarray(_uint8(out).numpy()))
        return arrays

    probes = probe_images()
    try:
        spy(images=probes[:1], do_rescale=False, do_normalize=False, return_tensors="pt")
        if not captured:
            return None
        kwargs.update(captured, return_tensors=None, disable_grouping=True)
        with warnings.catch_warnings():  # torch warns once per process; the pixels are only read
            warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING, category=UserWarning)
            ours = resize_crop(probes)
        theirs = through_processor(probes)
        same = len(ours) == len(theirs) and all(
            a.shape == b.shape and np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True)
        )
    except Exception as e:
        _once(logging.INFO, f"{type(processor).__name__}: no direct resize ({e!r})")
        return None
    if not same:
        _once(
            logging.INFO,
            f"{type(processor).__name__}: its direct resize differs from its own; "
            "the decode workers call the processor",
        )
        return None
    return resize_crop


def probe_images() -> list[Image.Image]:
    """Two photo-like probes (landscape and portrait, odd sizes), made
    deterministically: smooth gradients plus noise, so every resize weight
    and crop offset matters."""
    rng = np.random.default_rng(0)
    probes = []
    for width, height in ((333, 250), (201, 302)):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
        noisy = base + rng.normal(0, 24, base.shape)
        probes.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB"))
    return probes


def full_output(processor: Any, images: Sequence[Image.Image]) -> list[np.ndarray]:
    """The processor's own float32 `pixel_values`, one CHW array per image."""
    out = processor(images=list(images), return_tensors="pt")["pixel_values"]
    return list(np.ascontiguousarray(out.float().numpy()))


def checked_split(processor: Any) -> PixelSplit | None:
    """The processor's split, if it has one that gives its own output on the
    probes (to `TOLERANCE`); None otherwise, logged once per processor."""
    import torch

    name = type(processor).__name__
    try:
        if name == "TimmWrapperImageProcessor":
            split = _timm_split(processor)
        else:
            split = _transformers_split(processor)
        if split is None:
            _once(logging.INFO, f"{name}: no uint8 split; the decode workers send float32 pixels")
            return None
        probes = probe_images()
        expected = torch.from_numpy(np.stack(full_output(processor, probes)))
        got = split.normalization.apply(torch.from_numpy(np.stack(split.resize_crop(probes))))
        difference = float((got - expected).abs().max())
    except Exception as e:  # any surprise means the processor's own path
        _once(logging.INFO, f"{name}: no uint8 split ({type(e).__name__}: {e})")
        return None
    if got.shape != expected.shape or difference > TOLERANCE:
        _once(
            logging.WARNING,
            f"{name}: its uint8 split differs from its own output by {difference:.2g}; "
            "the decode workers send float32 pixels",
        )
        return None
    return split
