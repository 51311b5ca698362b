"""`LabelingSpec`: the single typed description of how images are labeled.

Every option is declared here once (`transforms.options.option`): type, default,
check and help text. The CLI flags and YAML keys, `LabelImages(**options)` and
`classify(**options)` are generated from these fields, so each entry point
accepts the same options and refuses the same mistakes with the same message.

Options are checked in two steps, both before anything runs:

1. `LabelingSpec(...)` parses each value and rejects contradictions that need
   no model (fp16 on CPU, labels without zero-shot, ...).
2. `transforms.resolve.resolve(spec)` probes the model, as HF's pipelines sort their parameters
   once at the edge (`_sanitize_parameters`): it decides the task (a CLIP or
   SigLIP checkpoint has no classification head, so candidate labels mean
   zero-shot), reads the label file, loads the weights once to refuse a model
   that transformers would partly initialize at random, and fixes the device
   a local run will use. The result is a concrete spec: `task` set, labels
   inline, `device` resolved where it can be.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transforms.images.decode import DEFAULT_MAX_PIXELS, DecodeOptions
from transforms.images.fetch import DEFAULT_ALLOWED_SCHEMES, FetchOptions
from transforms.model.batching import BatchSettings, batch_settings
from transforms.model.device import check_device_support
from transforms.model.label_set import (
    DEFAULT_HYPOTHESIS_TEMPLATE,
    LabelSet,
    LabelSetError,
)
from transforms.model.loading import ModelSpec
from transforms.model.postprocess import ClassificationFunction
from transforms.model.settings import HandlerSettings
from transforms.options import (
    ConfigError,
    boolean,
    check_keywords,
    choice,
    label_list,
    lower_list,
    non_negative_int,
    option,
    parse_fields,
    positive_float,
    positive_int,
    rate,
    str_list,
    text,
)

logger = logging.getLogger(__name__)

IMAGE_CLASSIFICATION = "image-classification"
ZERO_SHOT = "zero-shot-image-classification"
TASKS = (IMAGE_CLASSIFICATION, ZERO_SHOT)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "bf16")
QUANTIZATIONS = ("none", "int8")
FUNCTIONS = tuple(f.value for f in ClassificationFunction)


#: The `LabelingSpec` fields `LabelingSpec.fetch` is made of (the report rebuilds a
#: run's fetch options from them).
FETCH_FIELDS = (
    "allowed_schemes",
    "fetch_timeout",
    "max_image_bytes",
    "fetch_retries",
    "fetch_concurrency",
    "fetch_per_host",
    "block_private_networks",
)


@dataclass(frozen=True, kw_only=True)
class LabelingSpec:
    """Everything that decides how an image is fetched, decoded and labeled.

    Construct it with keywords; each value is parsed and checked here and a bad
    one raises `ConfigError` (a ValueError) naming the option. `resolve(spec)`
    then checks the model itself (`transforms.resolve`).

    Example::

        spec = resolve(LabelingSpec(model="path/to/model", top_k=3), local=True)
    """

    model: str = option(
        "default",
        text,
        "'default' (EfficientNet-Lite0, offline), a model directory, a gs:// directory or a hub id",
        metavar="ID_OR_PATH",
        path=True,
    )
    revision: str | None = option(
        None, text, "hub revision (branch, tag or commit) of --model", metavar="REV"
    )
    task: str | None = option(
        None,
        choice(TASKS),
        "image-classification or zero-shot-image-classification; by default the model "
        "decides: zero-shot for a CLIP/SigLIP checkpoint given candidate labels",
        metavar="TASK",
    )
    candidate_labels: tuple[str, ...] | None = option(
        None,
        label_list,
        "zero-shot labels, comma-separated (CSV quoting for commas inside a label)",
        metavar="LABELS",
    )
    candidate_labels_file: str | None = option(
        None,
        text,
        "zero-shot labels, one per line (local or gs://)",
        metavar="FILE",
        path=True,
    )
    hypothesis_template: tuple[str, ...] = option(
        (DEFAULT_HYPOTHESIS_TEMPLATE,),
        str_list,
        "zero-shot prompt with {} for the label; repeat it to ensemble prompts",
        metavar="TEMPLATE",
        repeatable=True,
    )
    top_k: int = option(
        5, non_negative_int, "labels kept per image, capped at the label count; 0 = all", "K"
    )
    threshold: float | None = option(
        None,
        rate,
        "multi-label tagging: labels/scores keep every label scoring at least T (after "
        "--function-to-apply), up to --top-k (0 = no cap), possibly none; label/score stay "
        "the top-1",
        "T",
    )
    embeddings: bool = option(
        False,
        boolean,
        "add an L2-normalized 'embedding' column from the same forward pass: the image "
        "embedding of CLIP/SigLIP, the features a classifier's head reads",
        switch=True,
    )
    function_to_apply: str = option(
        "default",
        choice(FUNCTIONS),
        "default|softmax|sigmoid|none, as in transformers (postprocessing)",
        metavar="FN",
    )
    batch_size: int | None = option(
        None, positive_int, "images per forward pass (default 4 on CPU, 64 on GPU)", "N"
    )
    min_batch_size: int | None = option(
        None, positive_int, "let BatchElements emit batches down to this size", "N"
    )
    max_batch_duration_secs: float | None = option(
        None, positive_float, "streaming: flush a partial batch after this long", "S"
    )
    device: str = option(
        "auto",
        choice(DEVICES),
        "auto|cpu|cuda; auto = cuda when available",
        "DEVICE",
        shared=True,
    )
    precision: str = option(
        "fp32", choice(PRECISIONS), "fp32|fp16|bf16 (fp16 needs a GPU)", "PRECISION"
    )
    compile: bool = option(
        False,
        boolean,
        "torch.compile the forward pass in the background; eager until it is ready",
        switch=True,
    )
    quantize: str = option(
        "none",
        choice(QUANTIZATIONS),
        "none|int8: dynamic int8 Linear layers on CPU (transformers like ViT)",
        "MODE",
    )
    model_copies: int | None = option(
        None, positive_int, "models per worker machine, shared across its processes", "N"
    )
    share_model_across_processes: bool = option(
        False, boolean, "one model per worker machine (large models)", "BOOL"
    )
    torch_threads: int | None = option(
        None,
        positive_int,
        "torch intra-op threads per process (default: all cores)",
        "N",
        shared=True,
    )
    tune_malloc: bool = option(
        True,
        boolean,
        "raise glibc malloc's trim and mmap thresholds in every labeling process, so the "
        "forward pass reuses its buffers instead of faulting in fresh pages (ignored when "
        "MALLOC_*_THRESHOLD_ or LD_PRELOAD is set)",
        "BOOL",
        shared=True,
    )
    fast_decode: bool = option(
        False,
        boolean,
        "decode large JPEGs at reduced scale: faster, but labels can differ from "
        "transformers.pipeline (measured trade in the README's Performance section)",
        switch=True,
        shared=True,
    )
    decode_threads: int | None = option(
        None,
        positive_int,
        "images decoded at once per worker process (default: one per core it may use, at most 8)",
        "N",
        shared=True,
    )
    max_image_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        positive_int,
        "decompression-bomb limit, in pixels",
        "PIXELS",
        shared=True,
    )
    max_image_bytes: int = option(
        50 << 20,
        positive_int,
        "images past this size fail as too_large",
        "BYTES",
        shared=True,
    )
    fetch_timeout: float = option(
        30.0,
        positive_float,
        "seconds per fetch attempt, for every scheme (connect, headers and body)",
        "S",
        shared=True,
    )
    fetch_concurrency: int = option(
        64, positive_int, "fetches in flight per worker process", "N", shared=True
    )
    fetch_per_host: int = option(
        32, positive_int, "http(s) fetches in flight per host", "N", shared=True
    )
    fetch_retries: int = option(
        3,
        non_negative_int,
        "retries of a transient failure (HTTP 408/425/429/5xx, timeouts, resets), "
        "with backoff and Retry-After; other failures are final",
        "N",
        shared=True,
    )
    block_private_networks: bool = option(
        False,
        boolean,
        "also refuse http(s) fetches from loopback and private addresses (untrusted "
        "manifests); link-local and cloud metadata addresses are always refused",
        switch=True,
        shared=True,
    )
    allowed_schemes: tuple[str, ...] = option(
        DEFAULT_ALLOWED_SCHEMES,
        lower_list,
        "URI schemes that may be fetched",
        "LIST",
        shared=True,
    )
    allow_pickle_weights: bool = option(
        False,
        boolean,
        "also load pickled .bin weights (trusted models only)",
        switch=True,
    )

    def __post_init__(self) -> None:
        parse_fields(self)
        check_combinations(self)

    @classmethod
    def from_options(cls, where: str, options: dict[str, Any]) -> LabelingSpec:
        """Build from keyword options; an unknown one is a TypeError naming it."""
        check_keywords(cls, options, where)
        return cls(**options)

    # -- derived settings (one place each) ------------------------------------------

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(self.model, self.revision, self.allow_pickle_weights)

    @property
    def label_set(self) -> LabelSet:
        return LabelSet(tuple(self.candidate_labels or ()), tuple(self.hypothesis_template))

    @property
    def fetch(self) -> FetchOptions:
        """The fetch options of these settings (the `FETCH_FIELDS`)."""
        return FetchOptions(
            allowed_schemes=self.allowed_schemes,
            timeout_s=self.fetch_timeout,
            max_bytes=self.max_image_bytes,
            retries=self.fetch_retries,
            concurrency=self.fetch_concurrency,
            per_host=self.fetch_per_host,
            block_private_networks=self.block_private_networks,
        )

    @property
    def decode(self) -> DecodeOptions:
        return DecodeOptions(
            max_pixels=self.max_image_pixels,
            fast=self.fast_decode,
            threads=self.decode_threads,
            tune_malloc=self.tune_malloc,
        )

    @property
    def batching(self) -> BatchSettings:
        return batch_settings(
            batch_size=self.batch_size,
            device=self.device,
            min_batch_size=self.min_batch_size,
            max_batch_duration_secs=self.max_batch_duration_secs,
        )

    @property
    def handler(self) -> HandlerSettings:
        """What the model handler needs of these settings."""
        zero_shot = self.task == ZERO_SHOT
        return HandlerSettings(
            model=self.model_spec,
            labels=self.label_set if zero_shot else None,
            function_to_apply=self.function_to_apply,
            top_k=self.top_k,
            threshold=self.threshold,
            embeddings=self.embeddings,
            device=self.device,
            precision=self.precision,
            quantize=self.quantize,
            compile=self.compile,
            torch_threads=self.torch_threads,
            tune_malloc=self.tune_malloc,
            batch_size=self.batch_size,
            batching=self.batching,
            model_copies=self.model_copies,
            share_model_across_processes=self.share_model_across_processes,
        )

    def effective(self) -> dict[str, Any]:
        """The settings that actually run, for summary.json."""
        return {
            "task": self.task,
            "device": self.device if self.device != "auto" else "auto (resolved on workers)",
            "precision": self.precision,
            "quantize": self.quantize,
            "decode": "fast" if self.fast_decode else "exact",
            "batch_size": self.batch_size
            or (
                self.batching.max_batch_size
                if self.device != "auto"
                else "auto (4 per forward pass on cpu, 64 on cuda, by the worker's device)"
            ),
            "threshold": self.threshold,
            "embeddings": self.embeddings,
        }


def check_combinations(spec: LabelingSpec) -> None:
    """Contradictions that need no model. Messages name the options."""
    if spec.device != "auto":  # "auto" is checked once resolved (`resolve`, the workers)
        check_device_support(spec.device, spec.precision, spec.quantize)
    if spec.quantize != "none" and spec.precision != "fp32":
        raise ConfigError("--quantize int8 needs --precision fp32 (it quantizes fp32 weights)")
    if (
        spec.batch_size is not None
        and spec.min_batch_size is not None
        and spec.min_batch_size > spec.batch_size
    ):
        raise ConfigError(
            f"--min-batch-size {spec.min_batch_size} is larger than --batch-size {spec.batch_size}"
        )
    if spec.revision and spec.model_spec.is_default:
        raise ConfigError("--revision applies to a hub --model id, not to the default model")
    has_labels = spec.candidate_labels is not None or spec.candidate_labels_file is not None
    if spec.candidate_labels is not None and spec.candidate_labels_file is not None:
        raise ConfigError("give --candidate-labels or --candidate-labels-file, not both")
    if spec.task == ZERO_SHOT or (spec.task is None and has_labels):
        if spec.function_to_apply != "default":
            raise ConfigError(
                "--function-to-apply does not apply to zero-shot classification: CLIP-like "
                "models use softmax over the labels, SigLIP-like models a sigmoid per label"
            )
        if spec.model_spec.is_default:
            given = (
                "--candidate-labels"
                if spec.candidate_labels is not None
                else "--candidate-labels-file"
                if spec.candidate_labels_file is not None
                else "--task zero-shot-image-classification"
            )
            raise ConfigError(
                f"zero-shot classification ({given}) needs a CLIP- or SigLIP-family "
                "--model; the default model is an ImageNet classifier"
            )
        if spec.task == ZERO_SHOT and not has_labels:
            raise ConfigError(
                "--task zero-shot-image-classification needs --candidate-labels or "
                "--candidate-labels-file"
            )
        if spec.candidate_labels is not None:
            try:
                spec.label_set  # noqa: B018 - validates labels and templates
            except LabelSetError as e:
                raise ConfigError(f"--candidate-labels: {e}") from None
    else:
        if has_labels:
            raise ConfigError(
                "--candidate-labels/--candidate-labels-file apply only to "
                "--task zero-shot-image-classification"
            )
        if spec.hypothesis_template != (DEFAULT_HYPOTHESIS_TEMPLATE,):
            raise ConfigError(
                "--hypothesis-template applies only to --task zero-shot-image-classification"
            )
