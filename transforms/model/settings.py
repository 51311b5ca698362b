"""`HandlerSettings`: what a model handler needs of the labeling options.

Built once from a `LabelingSpec` (`LabelingSpec.handler`), like `FetchOptions`
and `DecodeOptions`, so the handlers never see the options they do not use.
"""

from __future__ import annotations

from dataclasses import dataclass

from transforms.model.batching import BatchSettings
from transforms.model.label_set import LabelSet
from transforms.model.loading import ModelSpec


@dataclass(frozen=True, kw_only=True)
class HandlerSettings:
    """A handler's settings, checked where they were declared (`LabelingSpec`).

    Attributes:
        model: what to load.
        labels: the zero-shot label set; None for a classifier.
        function_to_apply: a classifier's score function (`--function-to-apply`).
        top_k, threshold, embeddings: postprocessing and outputs.
        device, precision, quantize, compile, torch_threads, tune_malloc: how
            the model runs; a device of "auto" is resolved when it loads.
        batch_size: `--batch-size` (None: the default of the device the
            model runs on, `forward_batch_size`).
        batching: BatchElements settings.
        model_copies, share_model_across_processes: RunInference model sharing.
    """

    model: ModelSpec
    labels: LabelSet | None = None
    function_to_apply: str = "default"
    top_k: int = 5
    threshold: float | None = None
    embeddings: bool = False
    device: str = "auto"
    precision: str = "fp32"
    quantize: str = "none"
    compile: bool = False
    torch_threads: int | None = None
    tune_malloc: bool = True
    batch_size: int | None
    batching: BatchSettings
    model_copies: int | None = None
    share_model_across_processes: bool = False
