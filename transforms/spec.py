"""`LabelingSpec`: the single typed description of how images are labeled.

Every option is declared here once (`transforms.options.option`): type, default,
check and help text. The CLI flags and YAML keys, `LabelImages(**options)` and
`classify(**options)` are generated from these fields, so each entry point
accepts the same options and refuses the same mistakes with the same message.

Options are checked in two steps, both before anything runs:

1. `LabelingSpec(...)` parses each value and rejects contradictions that need
   no model (fp16 on CPU, labels without zero-shot, ...).
2. `resolve(spec)` probes the model, as HF's pipelines sort their parameters
   once at the edge (`_sanitize_parameters`): it decides the task (a CLIP or
   SigLIP checkpoint has no classification head, so candidate labels mean
   zero-shot), reads the label file, loads the weights once to refuse a model
   that transformers would partly initialize at random, and fixes the device
   a local run will use. The result is a concrete spec: `task` set, labels
   inline, `device` resolved where it can be.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

from transforms.images.decode import DEFAULT_MAX_PIXELS, DecodeOptions
from transforms.images.fetch import DEFAULT_ALLOWED_SCHEMES, FetchOptions
from transforms.model.batching import BatchSettings, batch_settings
from transforms.model.label_set import (
    DEFAULT_HYPOTHESIS_TEMPLATE,
    LabelSet,
    LabelSetError,
    is_sigmoid_family,
)
from transforms.model.loading import ModelLoadError, ModelSpec
from transforms.model.postprocess import ClassificationFunction, resolve_function
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
    then checks the model itself.

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
        "auto", choice(DEVICES), "auto|cpu|cuda; auto = cuda when available", "DEVICE"
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
        None, positive_int, "torch intra-op threads per process (default: all cores)", "N"
    )
    tune_malloc: bool = option(
        True,
        boolean,
        "raise glibc malloc's trim and mmap thresholds in every labeling process, so the "
        "forward pass reuses its buffers instead of faulting in fresh pages (ignored when "
        "MALLOC_*_THRESHOLD_ or LD_PRELOAD is set)",
        "BOOL",
    )
    fast_decode: bool = option(
        False,
        boolean,
        "decode large JPEGs at reduced scale: faster, but labels can differ from "
        "transformers.pipeline (measured trade in the README)",
        switch=True,
    )
    decode_threads: int = option(2, positive_int, "images decoded at once per worker process", "N")
    max_image_pixels: int = option(
        DEFAULT_MAX_PIXELS, positive_int, "decompression-bomb limit, in pixels", "PIXELS"
    )
    max_image_bytes: int = option(
        50 << 20, positive_int, "images past this size fail as too_large", "BYTES"
    )
    fetch_timeout: float = option(
        30.0,
        positive_float,
        "seconds per fetch attempt, for every scheme (connect, headers and body)",
        "S",
    )
    fetch_concurrency: int = option(64, positive_int, "fetches in flight per worker process", "N")
    fetch_per_host: int = option(32, positive_int, "http(s) fetches in flight per host", "N")
    fetch_retries: int = option(3, non_negative_int, "retries of a transient fetch failure", "N")
    block_private_networks: bool = option(
        False,
        boolean,
        "also refuse http(s) fetches from loopback and private addresses (untrusted "
        "manifests); link-local and cloud metadata addresses are always refused",
        switch=True,
    )
    allowed_schemes: tuple[str, ...] = option(
        DEFAULT_ALLOWED_SCHEMES, lower_list, "URI schemes that may be fetched", "LIST"
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
            on_gpu=self.device == "cuda",
            min_batch_size=self.min_batch_size,
            max_batch_duration_secs=self.max_batch_duration_secs,
        )

    def effective(self) -> dict[str, Any]:
        """The settings that actually run, for summary.json."""
        return {
            "task": self.task,
            "device": self.device if self.device != "auto" else "auto (resolved on workers)",
            "precision": self.precision,
            "quantize": self.quantize,
            "decode": "fast" if self.fast_decode else "exact",
            "batch_size": self.batching.max_batch_size,
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


# ---- resolving against the model ---------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What the labeler needs to know of a model's config."""

    model_type: str
    zero_shot_only: bool  # a dual encoder (CLIP, SigLIP) without a classification head
    id2label: dict[int, str]
    config: Any = dataclasses.field(repr=False, compare=False, default=None)


@functools.lru_cache(maxsize=16)
def model_facts(spec: ModelSpec) -> ModelFacts:
    """Load the model's config (once per process) and describe it.

    Raises:
        ModelLoadError: the model cannot be found; the message says what to do.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    from transforms.model.loading import explain_load_error, from_pretrained_kwargs, resolve_model

    kwargs = {k: v for k, v in from_pretrained_kwargs(spec).items() if k != "use_safetensors"}
    try:
        config = AutoConfig.from_pretrained(resolve_model(spec), **kwargs)
    except ModelLoadError:
        raise
    except Exception as e:
        raise explain_load_error(spec, e) from e
    model_type = str(config.model_type)
    architectures = list(getattr(config, "architectures", None) or [])
    classifier_names = set(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values())
    has_head = any(
        a in classifier_names or a.endswith("ForImageClassification") for a in architectures
    )
    dual = model_type in MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES or (
        hasattr(config, "text_config") and hasattr(config, "vision_config")
    )
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return ModelFacts(model_type, dual and not has_head, id2label, config)


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
    """Refuse a precision or quantization that the device cannot run: the one check
    for a device named by the user, resolved on a local run, or resolved on a worker.

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


def read_label_file(path: str) -> tuple[str, ...]:
    """One label per line (local or any fsspec URI); blank lines are skipped."""
    import fsspec

    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            return tuple(line.strip() for line in f if line.strip())
    except FileNotFoundError:
        raise ConfigError(f"--candidate-labels-file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--candidate-labels-file {path} is not UTF-8 text: {e}") from None


def resolve(
    spec: LabelingSpec, *, local: bool, check_weights: bool = True, keep_model: bool = False
) -> LabelingSpec:
    """Check `spec` against its model and return the concrete spec that runs.

    Args:
        spec: a checked spec.
        local: the job runs on this machine, so "auto" becomes the device this
            machine has, and a device or precision it cannot run is refused
            now (exit 2) instead of on the workers.
        check_weights: load the weights once to refuse a model that
            transformers would partly initialize at random.
        keep_model: keep that loaded model for this process's handler (an
            in-process run), so the weights are read once.

    Raises:
        ConfigError, ModelLoadError: with a message that says what to pass.
    """
    facts = model_facts(spec.model_spec)
    has_labels = spec.candidate_labels is not None or spec.candidate_labels_file is not None
    task = spec.task
    if task is None:
        if facts.zero_shot_only:
            if not has_labels:
                raise ConfigError(
                    f"model {spec.model!r} ({facts.model_type}) is a zero-shot model with no "
                    "classification head: pass --candidate-labels 'a,b,c' (or "
                    "--candidate-labels-file FILE) to label images against your labels"
                )
            task = ZERO_SHOT
        else:
            task = IMAGE_CLASSIFICATION
            if has_labels:
                raise ConfigError(
                    f"--candidate-labels need a CLIP- or SigLIP-family model; {spec.model!r} "
                    f"({facts.model_type}) is an image classifier"
                )
    changes: dict[str, Any] = {"task": task}
    if task == ZERO_SHOT:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        )

        if facts.model_type not in MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES:
            raise ModelLoadError(
                f"model {spec.model!r} (model_type {facts.model_type!r}) has no image/text "
                "towers; zero-shot classification needs a CLIP- or SigLIP-family model"
            )
        if spec.candidate_labels_file is not None:
            labels = read_label_file(spec.candidate_labels_file)
            try:
                LabelSet(labels, spec.hypothesis_template)
            except LabelSetError as e:
                raise ConfigError(
                    f"--candidate-labels-file {spec.candidate_labels_file}: {e}"
                ) from None
            changes.update(candidate_labels=labels, candidate_labels_file=None)
    elif not facts.id2label:
        raise ModelLoadError(f"model {spec.model!r} has no id2label in its config")
    if local:
        device = resolve_device(spec.device)
        check_device_support(device, spec.precision, spec.quantize)
        changes["device"] = device
    resolved = dataclasses.replace(spec, **changes)
    if check_weights:
        from transforms.model.loading import check_pretrained

        check_pretrained(
            resolved.model_spec,
            zero_shot=task == ZERO_SHOT,
            precision=resolved.precision,
            keep=keep_model,
        )
    return resolved


def model_labels(spec: LabelingSpec) -> list[str]:
    """Every label a resolved spec can give, in the model's order (candidate
    labels for zero-shot, `id2label` for a classifier)."""
    if spec.task == ZERO_SHOT:
        return list(spec.label_set.labels)
    id2label = model_facts(spec.model_spec).id2label
    return [id2label[i] for i in sorted(id2label)]


def metadata(spec: LabelingSpec) -> dict[str, str]:
    """Parquet key-value metadata that describes how a resolved spec labels."""
    from transforms import __version__
    from transforms.model.default_model import DEFAULT_MODEL_NAME

    facts = model_facts(spec.model_spec)
    name = f"default ({DEFAULT_MODEL_NAME})" if spec.model_spec.is_default else spec.model
    meta = {
        "image_labeler.version": __version__,
        "image_labeler.task": str(spec.task),
        "image_labeler.model": name,
        "image_labeler.revision": spec.revision or "",
        "image_labeler.top_k": str(spec.top_k),
        "image_labeler.decode": "fast" if spec.fast_decode else "exact",
    }
    if spec.threshold is not None:
        meta["image_labeler.threshold"] = repr(spec.threshold)
    if spec.embeddings:
        meta["image_labeler.embedding"] = (
            "image embedding (get_image_features), L2-normalized"
            if spec.task == ZERO_SHOT
            else "input of the classification head, L2-normalized"
        )
    if spec.task == ZERO_SHOT:
        label_set = spec.label_set
        meta.update(
            {
                "image_labeler.function_to_apply": "sigmoid"
                if is_sigmoid_family(facts.model_type)
                else "softmax",
                "image_labeler.num_labels": str(len(label_set.labels)),
                "image_labeler.label_count": str(len(label_set.labels)),
                "image_labeler.label_set_sha256": label_set.digest(),
                "image_labeler.hypothesis_templates": json.dumps(list(label_set.templates)),
            }
        )
    else:
        meta.update(
            {
                "image_labeler.function_to_apply": resolve_function(
                    spec.function_to_apply, facts.config
                ).value,
                "image_labeler.num_labels": str(len(facts.id2label)),
            }
        )
    return meta
