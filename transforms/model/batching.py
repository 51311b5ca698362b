"""Batching settings for `beam.BatchElements`, pinned in one place.

RunInference reads them from the handler's `batch_elements_kwargs()`; nothing
else in the code base chooses a batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Images per forward pass when `--batch-size` is not given. On CPU, small
#: batches keep a CNN's activations in cache: MobileNetV2 in channels_last on 2
#: cores ran ~87 images/s at batch 8, ~58 at 16 and ~43 at 32 (see benchmarks/);
#: batch 4 beat 8 end to end (MobileNetV2 55 vs 45 images/s, EfficientNet-Lite0
#: 73 vs 56, ViT-B/16 the same), and 2 was slower again (52).
DEFAULT_CPU_BATCH_SIZE = 4
DEFAULT_GPU_BATCH_SIZE = 64


@dataclass(frozen=True)
class BatchSettings:
    """Arguments of `beam.BatchElements`.

    Attributes:
        min_batch_size: smallest batch BatchElements emits (except a bundle's last).
        max_batch_size: largest batch; equal to min for a fixed batch size, which
            keeps tensor shapes stable for the model.
        max_batch_duration_secs: in streaming pipelines, flush a partial batch
            after this long. None leaves Beam's default.
    """

    min_batch_size: int
    max_batch_size: int
    max_batch_duration_secs: float | None = None

    def __post_init__(self) -> None:
        if self.min_batch_size < 1 or self.max_batch_size < self.min_batch_size:
            raise ValueError(
                f"batch sizes must satisfy 1 <= min ({self.min_batch_size}) <= "
                f"max ({self.max_batch_size})"
            )
        if self.max_batch_duration_secs is not None and self.max_batch_duration_secs <= 0:
            raise ValueError("max_batch_duration_secs must be positive")

    def as_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "min_batch_size": self.min_batch_size,
            "max_batch_size": self.max_batch_size,
        }
        if self.max_batch_duration_secs is not None:
            kwargs["max_batch_duration_secs"] = self.max_batch_duration_secs
        return kwargs


def forward_batch_size(batch_size: int | None, device: str) -> int:
    """Images per forward pass on a resolved device: `batch_size`, else the
    device's default."""
    if batch_size:
        return batch_size
    return DEFAULT_GPU_BATCH_SIZE if device.startswith("cuda") else DEFAULT_CPU_BATCH_SIZE


def batch_settings(
    *,
    batch_size: int | None,
    device: str,
    min_batch_size: int | None = None,
    max_batch_duration_secs: float | None = None,
) -> BatchSettings:
    """The batching used for a job.

    Args:
        batch_size: images per forward pass; a device default when None.
        device: "cpu" or "cuda", or "auto" when the device is only known on the
            workers (a remote run): batches then grow up to the GPU default,
            and a worker that resolves "auto" to the CPU runs them in forward
            passes of the CPU default (`forward_batch_size`).
        min_batch_size: lets BatchElements emit smaller batches; defaults to
            `batch_size`, i.e. fixed-size batches.
        max_batch_duration_secs: see `BatchSettings`.
    """
    if device == "auto" and not batch_size:
        return BatchSettings(
            min_batch_size=min_batch_size or DEFAULT_CPU_BATCH_SIZE,
            max_batch_size=DEFAULT_GPU_BATCH_SIZE,
            max_batch_duration_secs=max_batch_duration_secs,
        )
    size = forward_batch_size(batch_size, device)
    return BatchSettings(
        min_batch_size=min_batch_size or size,
        max_batch_size=size,
        max_batch_duration_secs=max_batch_duration_secs,
    )
