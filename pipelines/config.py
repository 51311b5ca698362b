"""The job's typed config: CLI flags over YAML defaults, validated at build time.

Every job option is declared once in `OPTIONS`; argparse flags, YAML keys and
`JobConfig` fields all come from it. YAML keys use the flag's name with dashes
or underscores (`top-k` or `top_k`). Flags override YAML, YAML overrides the
defaults. Unknown keys and unknown flags are errors that name them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml

from transforms.decode import DEFAULT_MAX_PIXELS
from transforms.fetch import DEFAULT_ALLOWED_SCHEMES
from transforms.handler_base import DEVICES, PRECISIONS, QUANTIZATIONS, check_quantize
from transforms.postprocess import ClassificationFunction
from transforms.sources import FORMATS

IMAGE_CLASSIFICATION = "image-classification"
ZERO_SHOT = "zero-shot-image-classification"
TASKS = (IMAGE_CLASSIFICATION, ZERO_SHOT)


class ConfigError(ValueError):
    """A bad option. The message names the option and says what is expected."""


def _positive_int(value: Any) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be >= 1")
    return number


def _non_negative_int(value: Any) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def _positive_float(value: Any) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def _rate(value: Any) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError("must be between 0 and 1")
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _csv_list(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(str(item).strip().lower() for item in items if str(item).strip())


def _label_list(value: Any) -> tuple[str, ...]:
    """Labels from a YAML list, or from a comma-separated string with CSV quoting
    (``'cat,"hot dog, grilled",car'``)."""
    if isinstance(value, (list, tuple)):
        return tuple(str(item).strip() for item in value)
    rows = list(csv.reader([str(value)], skipinitialspace=True))
    return tuple(item.strip() for item in rows[0]) if rows else ()


def _str_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(item) for item in value)
    return (str(value),)


def _choice(choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value)
        if text not in choices:
            raise ValueError(f"must be one of {list(choices)}")
        return text

    return parse


@dataclass(frozen=True)
class Option:
    """One job option: its flag, its parser and its help text."""

    name: str  # field name in JobConfig, e.g. "top_k"
    parse: Callable[[Any], Any]
    help: str
    metavar: str | None = None
    flag_only: bool = False  # not allowed in YAML (e.g. --config itself)
    is_switch: bool = False  # a flag without a value
    repeatable: bool = False  # the flag may be given several times

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("input", str, "manifest (txt/CSV/JSONL) or Parquet: file, glob or URI", "INPUT"),
    Option("output", str, "output directory (local or gs://)", "OUTPUT_DIR"),
    Option("config", str, "YAML file of defaults for these options", "FILE.yaml", flag_only=True),
    Option("task", _choice(TASKS), f"one of {', '.join(TASKS)}", "TASK"),
    Option("torch_threads", _positive_int, "torch intra-op threads per process", "N"),
    Option(
        "model", str, "'default', a model directory, a gs:// directory or a hub id", "ID_OR_PATH"
    ),
    Option("revision", str, "hub revision (branch, tag or commit) of --model", "REV"),
    Option("input_format", _choice(("auto", *FORMATS)), "input format; auto goes by extension"),
    Option(
        "uri_column",
        str,
        "column with image URIs (default: uri, then image_url/url/path/image_path)",
        "NAME",
    ),
    Option(
        "image_column",
        str,
        "Parquet column holding the images (binary, or a {bytes, path} struct)",
        "NAME",
    ),
    Option(
        "keep_image_column",
        _bool,
        "copy the image bytes to the output too",
        is_switch=True,
    ),
    Option(
        "candidate_labels",
        _label_list,
        "zero-shot labels, comma-separated (CSV quoting for commas inside a label)",
        "LABELS",
    ),
    Option("candidate_labels_file", str, "zero-shot labels, one per line (local or gs://)", "FILE"),
    Option(
        "hypothesis_template",
        _str_list,
        "zero-shot prompt with {} for the label; repeat it to ensemble prompts",
        "TEMPLATE",
        repeatable=True,
    ),
    Option(
        "top_k", _non_negative_int, "labels kept per image, capped at the label count; 0 = all", "K"
    ),
    Option(
        "function_to_apply",
        _choice(tuple(f.value for f in ClassificationFunction)),
        "default|softmax|sigmoid|none, as in transformers",
    ),
    Option(
        "batch_size", _positive_int, "images per forward pass (default 4 on CPU, 64 on GPU)", "N"
    ),
    Option(
        "min_batch_size", _positive_int, "let BatchElements emit batches down to this size", "N"
    ),
    Option(
        "max_batch_duration_secs",
        _positive_float,
        "streaming: flush a partial batch after this long",
        "S",
    ),
    Option("device", _choice(DEVICES), "auto|cpu|cuda; auto = cuda when available"),
    Option("precision", _choice(PRECISIONS), "fp32|fp16|bf16 (fp16 needs a GPU)"),
    Option(
        "compile",
        _bool,
        "torch.compile the forward pass in the background; eager until it is ready",
        is_switch=True,
    ),
    Option(
        "quantize",
        _choice(QUANTIZATIONS),
        "none|int8: dynamic int8 Linear layers on CPU (transformers like ViT)",
    ),
    Option(
        "model_copies", _positive_int, "models per worker machine, shared across its processes", "N"
    ),
    Option(
        "share_model_across_processes", _bool, "one model per worker machine (large models)", "BOOL"
    ),
    Option("num_shards", _non_negative_int, "output Parquet shards; 0 lets the runner decide", "N"),
    Option(
        "overwrite", _bool, "replace the shards and summary in a non-empty --output", is_switch=True
    ),
    Option(
        "skip_existing",
        str,
        "a previous output dir: label only rows whose URI has no ok row there "
        "(same model, revision and label set)",
        "PREVIOUS_OUTPUT_DIR",
    ),
    Option(
        "max_error_rate", _rate, "exit non-zero when more than this share of rows failed", "RATE"
    ),
    Option("fetch_timeout", _positive_float, "seconds per network request", "S"),
    Option("fetch_concurrency", _positive_int, "fetches in flight per worker process", "N"),
    Option("fetch_per_host", _positive_int, "http(s) fetches in flight per host", "N"),
    Option("fetch_retries", _non_negative_int, "retries of a transient fetch failure", "N"),
    Option("decode_threads", _positive_int, "images decoded at once per worker process", "N"),
    Option("jpeg_draft", _bool, "decode large JPEGs at reduced scale (much faster)", "BOOL"),
    Option("max_image_bytes", _positive_int, "downloads past this size fail as too_large", "BYTES"),
    Option("max_image_pixels", _positive_int, "decompression-bomb limit, in pixels", "PIXELS"),
    Option("allowed_schemes", _csv_list, "URI schemes that may be fetched", "LIST"),
    Option(
        "allow_pickle_weights",
        _bool,
        "also load pickled .bin weights (trusted models only)",
        is_switch=True,
    ),
    Option("progress", _bool, "show live progress on local runs", "BOOL"),
)
_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class JobConfig:
    """A validated labeling job. Built by `load_config`, never half-filled."""

    input: str
    output: str
    task: str = IMAGE_CLASSIFICATION
    model: str = "default"
    revision: str | None = None
    input_format: str = "auto"
    uri_column: str | None = None
    image_column: str | None = None
    keep_image_column: bool = False
    candidate_labels: tuple[str, ...] | None = None
    candidate_labels_file: str | None = None
    hypothesis_template: tuple[str, ...] = ("This is a photo of {}.",)
    top_k: int = 5
    function_to_apply: str = "default"
    batch_size: int | None = None
    min_batch_size: int | None = None
    max_batch_duration_secs: float | None = None
    device: str = "auto"
    precision: str = "fp32"
    model_copies: int | None = None
    share_model_across_processes: bool = False
    torch_threads: int | None = None
    compile: bool = False
    quantize: str = "none"
    num_shards: int = 0
    overwrite: bool = False
    skip_existing: str | None = None
    max_error_rate: float | None = None
    fetch_timeout: float = 30.0
    fetch_concurrency: int = 64
    fetch_per_host: int = 32
    fetch_retries: int = 3
    decode_threads: int = 2
    jpeg_draft: bool = True
    max_image_bytes: int = 50 << 20
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    allowed_schemes: tuple[str, ...] = DEFAULT_ALLOWED_SCHEMES
    allow_pickle_weights: bool = False
    progress: bool = True
    config: str | None = None
    pipeline_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, JSON-ready (for summary.json)."""
        data = dataclasses.asdict(self)
        data["allowed_schemes"] = list(self.allowed_schemes)
        data["hypothesis_template"] = list(self.hypothesis_template)
        if self.candidate_labels is not None:
            data["candidate_labels"] = list(self.candidate_labels)
        return data


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="label-images",
        description=(
            "Label images listed in a manifest or Parquet file and write Parquet with "
            "labels and scores. Any Beam pipeline option (--runner, "
            "--direct_num_workers, Dataflow options ...) is passed through."
        ),
        allow_abbrev=False,
    )
    for option in OPTIONS:
        if option.repeatable:
            parser.add_argument(
                option.flag,
                dest=option.name,
                action="append",
                default=None,
                metavar=option.metavar,
                help=option.help,
            )
        elif option.is_switch:
            parser.add_argument(
                option.flag,
                dest=option.name,
                action="store_const",
                const=True,
                default=None,
                help=option.help,
            )
        else:
            parser.add_argument(
                option.flag,
                dest=option.name,
                default=None,
                metavar=option.metavar,
                help=option.help,
            )
    return parser


def read_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config (local or any fsspec URI) into a mapping."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"--config {path} does not exist") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of option: value")
    return data


def _parse_value(option: Option, value: Any, source: str) -> Any:
    if value is None:
        return None
    try:
        return option.parse(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source} {option.flag}: {value!r} {e}") from e


def merge_config(
    flags: Mapping[str, Any], yaml_values: Mapping[str, Any], yaml_path: str | None
) -> JobConfig:
    """Defaults < YAML < flags, each value parsed and checked."""
    values: dict[str, Any] = {}
    pipeline_options: dict[str, Any] = {}
    source = f"config {yaml_path}:" if yaml_path else "config:"
    for raw_key, raw_value in yaml_values.items():
        key = str(raw_key).replace("-", "_")
        if key == "pipeline_options":
            if not isinstance(raw_value, dict):
                raise ConfigError(f"{source} pipeline_options must be a mapping")
            pipeline_options = dict(raw_value)
            continue
        option = _BY_NAME.get(key)
        if option is None or option.flag_only:
            raise ConfigError(
                f"{source} unknown key {raw_key!r}; known keys are "
                f"{sorted(o.name for o in OPTIONS if not o.flag_only)} and pipeline_options"
            )
        values[key] = _parse_value(option, raw_value, source)
    for key, raw_value in flags.items():
        if raw_value is not None:
            values[key] = _parse_value(_BY_NAME[key], raw_value, "flag")
    if values.get("hypothesis_template") == ():
        raise ConfigError("--hypothesis-template needs at least one template")
    for required in ("input", "output"):
        if not values.get(required):
            raise ConfigError(f"--{required} is required (as a flag or in --config)")
    values = {k: v for k, v in values.items() if v is not None}
    config = JobConfig(**values, pipeline_options=pipeline_options)
    validate(config)
    return config


def validate(config: JobConfig) -> None:
    """Reject contradictory options."""
    if config.precision == "fp16" and config.device == "cpu":
        raise ConfigError("--precision fp16 needs a GPU; use --precision bf16 or fp32 on CPU")
    try:
        check_quantize(config.quantize, config.device, config.precision)
    except ValueError as e:
        raise ConfigError(f"--quantize: {e}") from e
    if (
        config.batch_size is not None
        and config.min_batch_size is not None
        and config.min_batch_size > config.batch_size
    ):
        raise ConfigError(
            f"--min-batch-size {config.min_batch_size} is larger than "
            f"--batch-size {config.batch_size}"
        )
    if config.revision and config.model == "default":
        raise ConfigError("--revision applies to a hub --model id, not to the default model")
    if not config.allowed_schemes:
        raise ConfigError("--allowed-schemes must name at least one scheme")
    has_labels = config.candidate_labels is not None or config.candidate_labels_file is not None
    if config.task == ZERO_SHOT:
        if config.candidate_labels is not None and config.candidate_labels_file is not None:
            raise ConfigError("give --candidate-labels or --candidate-labels-file, not both")
        if not has_labels:
            raise ConfigError(
                "--task zero-shot-image-classification needs --candidate-labels or "
                "--candidate-labels-file"
            )
        if config.function_to_apply != "default":
            raise ConfigError(
                "--function-to-apply does not apply to zero-shot classification: CLIP-like "
                "models use softmax over the labels, SigLIP-like models a sigmoid per label"
            )
        if config.model == "default":
            raise ConfigError(
                "zero-shot classification needs a CLIP- or SigLIP-family --model "
                "(the default model is an ImageNet classifier)"
            )
    else:
        if has_labels:
            raise ConfigError(
                "--candidate-labels/--candidate-labels-file apply only to "
                "--task zero-shot-image-classification"
            )
        if config.hypothesis_template != JobConfig.hypothesis_template:
            raise ConfigError(
                "--hypothesis-template applies only to --task zero-shot-image-classification"
            )


def pipeline_option_args(options: Mapping[str, Any]) -> list[str]:
    """Turn a YAML `pipeline_options` mapping into Beam flags."""
    args: list[str] = []
    for key, value in options.items():
        flag = f"--{key}"
        if isinstance(value, bool):
            if value:
                args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [f"{flag}={item}" for item in value]
        else:
            args.append(f"{flag}={value}")
    return args


def load_config(argv: Sequence[str]) -> tuple[JobConfig, list[str]]:
    """Parse argv into a `JobConfig` and the Beam pipeline args.

    Returns:
        The job config and the remaining args, which are all known Beam options
        (YAML `pipeline_options` first, so flags override them).

    Raises:
        ConfigError: for an unknown key or flag, or a bad value.
    """
    parser = build_arg_parser()
    known, rest = parser.parse_known_args(list(argv))
    flags = vars(known)
    yaml_path = flags.pop("config")
    yaml_values = read_yaml(yaml_path) if yaml_path else {}
    config = merge_config(flags, yaml_values, yaml_path)
    if yaml_path:
        config = dataclasses.replace(config, config=yaml_path)
    beam_args = pipeline_option_args(config.pipeline_options) + rest
    check_beam_args(beam_args)
    return config, beam_args


def check_beam_args(args: Sequence[str]) -> None:
    """Fail on any arg that is not a Beam pipeline option, naming it."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    # Beam's own parser class: some option views register value-provider args.
    parser = _BeamArgumentParser(allow_abbrev=False, add_help=False, conflict_handler="resolve")
    seen: set[type] = set()
    stack = list(PipelineOptions.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:
            continue  # an option registered twice by two views
    _, unknown = parser.parse_known_args(list(args))
    if unknown:
        flags = [u for u in unknown if u.startswith("-")] or unknown
        raise ConfigError(
            f"unknown option(s) {flags}: not a label-images option nor a Beam pipeline "
            "option (see label-images --help)"
        )
