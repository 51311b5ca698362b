"""The job's typed config: CLI flags over YAML defaults, generated from the option fields.

A job has two groups of options, each a dataclass whose fields are declared once
with `transforms.options.option`:

- `JobConfig`'s own fields: where rows come from and where output goes;
- `LabelingSpec` (`transforms/spec.py`): how images are labeled, the same
  options `LabelImages` and `classify()` take.

argparse flags and YAML keys are generated from both. YAML keys use the
option's name with dashes or underscores (`top-k` or `top_k`). Flags override
YAML, YAML overrides the defaults. Unknown keys and unknown flags are errors
that name them. A YAML file's relative paths resolve against its own folder.
"""

from __future__ import annotations

import argparse
import os
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml

from transforms import __version__
from transforms.errors import redact
from transforms.images.sources import FORMATS
from transforms.models import (
    MODELS_OPTION,
    NamedSpec,
    named_specs,
    shared_values,
    spec_values,
)
from transforms.options import (
    OPTION,
    ConfigError,
    OptionInfo,
    boolean,
    choice,
    default_of,
    flag,
    non_negative_int,
    option,
    option_fields,
    parse_fields,
    parse_value,
    positive_int,
    rate,
    text,
)
from transforms.spec import IMAGE_CLASSIFICATION, TASKS, ZERO_SHOT, LabelingSpec
from transforms.uri import has_scheme


def column_prefix(value: Any) -> str:
    prefix = str(value)
    if prefix and not all(ch.isalnum() or ch in "_-." for ch in prefix):
        raise ValueError("may hold only letters, digits, '_', '-' and '.'")
    return prefix


def encoding_name(value: Any) -> str:
    import codecs

    name = text(value)
    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError("is not a known text encoding (e.g. utf-8, latin-1, cp1252)") from None
    return name


__all__ = [
    "IMAGE_CLASSIFICATION",
    "TASKS",
    "ZERO_SHOT",
    "ConfigError",
    "JobConfig",
    "build_arg_parser",
    "load_config",
]

#: Options that were renamed: the old name's error says what to use instead.
RENAMED = {
    "jpeg_draft": "--fast-decode (exact decoding is now the default; --fast-decode opts in "
    "to JPEG draft decoding)",
}

#: Beam pipeline options that name files: relative values in a YAML config
#: resolve against the config file's folder.
PATH_PIPELINE_OPTIONS = frozenset(
    {"setup_file", "requirements_file", "extra_package", "extra_packages", "dataflow_job_file"}
)


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """A validated labeling job: its input and output, and its `LabelingSpec`."""

    input: str = option(
        None,
        text,
        "manifest (txt/CSV/JSONL, possibly compressed), Parquet, Arrow (a datasets "
        "save_to_disk folder), an img2dataset folder or WebDataset .tar shards: file, glob, "
        "folder, brace pattern ({000000..000099}) or URI (local, gs://, http(s)://, s3://)",
        metavar="INPUT",
        path=True,
    )
    output: str = option(
        None,
        text,
        "output directory (local or gs://): part-*.parquet, with summary.json and "
        "report.html in its __label_images__/",
        metavar="OUTPUT_DIR",
        path=True,
    )
    input_format: str = option(
        "auto",
        choice(("auto", *FORMATS)),
        "input format; auto goes by extension (unknown ones are plain text) and "
        "recognizes img2dataset and save_to_disk folders",
        "FORMAT",
    )
    input_encoding: str = option(
        "utf-8",
        encoding_name,
        "text encoding of txt/CSV/JSONL manifests (a UTF-8 BOM is always skipped); lines "
        "that are not valid in it become bad_encoding rows",
        "CODEC",
    )
    uri_column: str | None = option(
        None,
        text,
        "column with image URIs (default: uri, then image_url/url/path/image_path)",
        "NAME",
    )
    image_column: str | None = option(
        None,
        text,
        "Parquet column holding the images (binary, or a {bytes, path} struct)",
        "NAME",
    )
    keep_image_column: bool = option(
        False, boolean, "copy the image bytes to the output too", switch=True
    )
    num_shards: int = option(
        0,
        non_negative_int,
        "0: part files committed as the run goes; N: exactly N files, written at "
        "the end by Beam's sink",
        "N",
    )
    overwrite: bool = option(
        False,
        boolean,
        "replace this tool's files in a non-empty --output once this run "
        "commits (until then the previous output stays readable)",
        switch=True,
    )
    resume: bool = option(
        False,
        boolean,
        "continue an interrupted run in --output: label only the rows not yet committed",
        switch=True,
    )
    commit_every: int = option(
        2000,
        positive_int,
        "rows per committed part file per worker (also committed every minute and at the "
        "end of each bundle)",
        "N",
    )
    output_prefix: str = option(
        "",
        column_prefix,
        "prefix of the columns the labeler adds (pred_ gives pred_label, pred_score ...), "
        "so input columns of those names are kept",
        "PREFIX",
    )
    skip_existing: str | None = option(
        None,
        text,
        "a previous output dir: label only rows whose URI has no ok row there "
        "(same model, revision and label set)",
        "PREVIOUS_OUTPUT_DIR",
        path=True,
    )
    max_error_rate: float | None = option(
        None, rate, "exit 3 when more than this share of rows failed", "RATE"
    )
    progress: bool = option(True, boolean, "show live progress on local runs", "BOOL")
    verbose: bool = option(
        False,
        boolean,
        "also print the libraries' logs and progress bars and our INFO lines "
        "(by default a run prints only its progress, summary, paths, warnings and errors)",
        switch=True,
    )
    report: bool = option(
        True,
        boolean,
        "write __label_images__/report.html (charts, thumbnails, failures) into --output",
        "BOOL",
    )
    models: tuple[dict[str, Any], ...] = field(default=(), metadata={OPTION: MODELS_OPTION})
    labeling: LabelingSpec = field(default_factory=LabelingSpec)
    #: The models of the pass (`named_specs`): one unnamed spec, `labeling`,
    #: without `models`; derived from `models` when not given.
    model_specs: tuple[NamedSpec, ...] = ()
    config: str | None = None
    pipeline_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_fields(self)
        if not self.model_specs:
            specs = (
                named_specs(spec_values(self.labeling), self.models)
                if self.models
                else (NamedSpec(None, self.labeling),)
            )
            object.__setattr__(self, "model_specs", specs)
        for required in ("input", "output"):
            if not getattr(self, required):
                raise ConfigError(f"--{required} is required (as a flag or in --config)")
        if self.resume and self.overwrite:
            raise ConfigError(
                "give --resume (continue the run in --output) or --overwrite, not both"
            )
        if self.resume and self.num_shards:
            raise ConfigError(
                "--resume needs incremental commits; --num-shards writes every file at the end"
            )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, JSON-ready (for summary.json), with credentials in URIs
        (user:password@, query strings such as signatures and tokens) redacted."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f, _ in option_fields(JobConfig)}
        data.update(
            {f.name: getattr(self.labeling, f.name) for f, _ in option_fields(LabelingSpec)}
        )
        # Each model's options as they run (its defaults and its entry).
        shared = shared_values(data)
        data["models"] = [
            {"name": m.name, **{k: v for k, v in spec_values(m.spec).items() if k not in shared}}
            for m in self.model_specs
            if m.name is not None
        ]
        data = {k: _json_ready(v) for k, v in data.items()}
        data["config"] = self.config
        data["pipeline_options"] = dict(self.pipeline_options)
        return _redacted(data)


def _json_ready(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    return value


def all_options() -> Iterator[tuple[str, OptionInfo, type]]:
    """Every option as (name, info, owner class): the job's, then the labeling ones."""
    for cls in (JobConfig, LabelingSpec):
        for f, info in option_fields(cls):
            yield f.name, info, cls


_HELP_EPILOG = """\
examples:
  # label a local manifest with the offline default model (exact decoding)
  label-images --input photos.txt --output out/

  # Parquet with embedded images (Hugging Face datasets' Image column)
  label-images --input data/*.parquet --image-column image --output out/

  # zero-shot with a CLIP checkpoint and your own labels
  label-images --input photos.csv --model ./clip-vit-base-patch32 \\
      --candidate-labels 'cat,dog,"hot dog, grilled"' --output out/

  # Dataflow (see configs/dataflow-gpu.yaml)
  label-images --config configs/dataflow-gpu.yaml --runner DataflowRunner --input gs://b/m.csv \\
      --output gs://b/labels --project P --region us-central1 --temp_location gs://b/tmp

  # continue a run that was killed, then rebuild its report
  label-images --input photos.txt --output out/ --resume
  label-images report out/

  # WebDataset shards, with embeddings and multi-label tags (SigLIP)
  label-images --input 'gs://b/shards/{000000..000099}.tar' --model ./siglip \\
      --candidate-labels-file tags.txt --threshold 0.3 --top-k 0 --embeddings --output out/

  # label only what a previous output did not label
  label-images --input photos.txt --skip-existing out/ --output out-2/

exit codes: 0 ran (some rows may have failed), 1 the job failed while running,
2 bad configuration or input (nothing was read or written), 3 --max-error-rate exceeded.
"""


def _default_text(name: str, default: Any) -> str:
    if name in ("input", "output"):
        return "required"
    if default is None or default == "" or default == ():
        return ""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (list, tuple)):
        return "`" + ",".join(str(v) for v in default) + "`"
    return f"`{default}`"


def option_table() -> str:
    """The README's table of every option (flag, YAML key, default, help), made
    from the declarations; `tests/test_config_contract.py` checks the README
    against it. Print it with `python -m pipelines.config`."""
    rows = ["| flag | YAML key | default | meaning |", "|---|---|---|---|"]
    rows.append("| `--config FILE.yaml` | | | YAML file of defaults for these options |")
    for f, info in (*option_fields(JobConfig), *option_fields(LabelingSpec)):
        name = f.name
        value = f" {info.metavar}" if info.metavar and not info.switch else ""
        help_text = info.help.replace("|", "\\|")
        rows.append(
            f"| `{flag(name)}{value}` | `{name}` | "
            f"{_default_text(name, default_of(f))} | {help_text} |"
        )
    return "\n".join(rows) + "\n"


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="label-images",
        description=(
            "Label images listed in a manifest or Parquet file and write Parquet with "
            "labels and scores. Any Beam pipeline option (--runner, "
            "--direct_num_workers, Dataflow options ...) is passed through."
        ),
        epilog=_HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"label-images {__version__}")
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="YAML file of defaults for these options"
    )
    for name, info, _ in all_options():
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": info.help}
        if info.repeatable:
            kwargs.update(action="append", metavar=info.metavar)
        elif info.switch:
            kwargs.update(action="store_const", const=True)
        else:
            kwargs.update(metavar=info.metavar)
        parser.add_argument(flag(name), **kwargs)
    return parser


def read_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config (local or any fsspec URI) into a mapping."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        problem = " ".join(str(e).split())
        raise ConfigError(f"--config {path} is not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of option: value")
    return data


def _relative_to(value: Any, base: str, *, must_exist: bool = False) -> Any:
    """`value` joined to `base` when it is a relative local path."""
    if not isinstance(value, str) or not value or has_scheme(value) or os.path.isabs(value):
        return value
    if has_scheme(base):
        return posixpath.join(base, value)
    joined = os.path.normpath(os.path.join(base, value))
    if must_exist and not os.path.exists(joined):
        return value  # e.g. a hub id such as "org/model"
    return joined


def _yaml_values(data: Mapping[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Option values and pipeline_options from a YAML mapping, paths made absolute."""
    infos = {name: info for name, info, _ in all_options()}
    base = posixpath.dirname(path) if has_scheme(path) else os.path.dirname(os.path.abspath(path))
    values: dict[str, Any] = {}
    pipeline_options: dict[str, Any] = {}
    for raw_key, raw_value in data.items():
        key = str(raw_key).replace("-", "_")
        if key == "pipeline_options":
            if not isinstance(raw_value, dict):
                raise ConfigError(f"config {path}: pipeline_options must be a mapping")
            for name, value in raw_value.items():
                if str(name) in PATH_PIPELINE_OPTIONS:
                    if isinstance(value, (list, tuple)):
                        value = [_relative_to(v, base) for v in value]
                    else:
                        value = _relative_to(value, base)
                pipeline_options[str(name)] = value
            continue
        if key == "models" and isinstance(raw_value, list):
            raw_value = [_entry_paths(entry, infos, base) for entry in raw_value]
        info = infos.get(key)
        if info is None:
            renamed = f" ({key} is now {RENAMED[key]})" if key in RENAMED else ""
            raise ConfigError(
                f"config {path}: unknown key {raw_key!r}{renamed}; known keys are "
                f"{sorted(infos)} and pipeline_options"
            )
        if info.path:
            raw_value = _relative_to(raw_value, base, must_exist=key == "model")
        values[key] = raw_value
    return values, pipeline_options


def _entry_paths(entry: Any, infos: Mapping[str, OptionInfo], base: str) -> Any:
    """A YAML `models:` entry with its relative paths resolved against `base`."""
    if not isinstance(entry, Mapping):
        return entry  # `model_entries` refuses it, naming the entry
    resolved = {}
    for raw_key, value in entry.items():
        key = str(raw_key).replace("-", "_")
        info = infos.get(key)
        if info is not None and info.path:
            value = _relative_to(value, base, must_exist=key == "model")
        resolved[raw_key] = value
    return resolved


def merge_config(
    flags: Mapping[str, Any],
    yaml_values: Mapping[str, Any],
    yaml_path: str | None = None,
    pipeline_options: Mapping[str, Any] | None = None,
) -> JobConfig:
    """Defaults < YAML < flags, each value parsed and checked by its option."""
    infos = {name: (info, cls) for name, info, cls in all_options()}
    values = dict(yaml_values)
    values.update({k: v for k, v in flags.items() if v is not None})
    parsed = {key: parse_value(key, infos[key][0], value) for key, value in values.items()}
    labeling = {k: v for k, v in parsed.items() if infos[k][1] is LabelingSpec and v is not None}
    job = {k: v for k, v in parsed.items() if infos[k][1] is JobConfig and v is not None}
    if job.get("models"):
        # The labeling options outside `models` are every entry's defaults;
        # the job's own spec keeps only the options of the whole pass.
        specs = named_specs(labeling, job["models"])
        return JobConfig(
            **job,
            labeling=LabelingSpec(**shared_values(labeling)),
            model_specs=specs,
            config=yaml_path,
            pipeline_options=dict(pipeline_options or {}),
        )
    return JobConfig(
        **job,
        labeling=LabelingSpec(**labeling),
        config=yaml_path,
        pipeline_options=dict(pipeline_options or {}),
    )


def pipeline_option_args(options: Mapping[str, Any]) -> list[str]:
    """Turn a YAML `pipeline_options` mapping into Beam flags."""
    args: list[str] = []
    for key, value in options.items():
        name = f"--{key}"
        if isinstance(value, bool):
            if value:
                args.append(name)
        elif isinstance(value, (list, tuple)):
            args += [f"{name}={item}" for item in value]
        else:
            args.append(f"{name}={value}")
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
    yaml_values: dict[str, Any] = {}
    pipeline_options: dict[str, Any] = {}
    if yaml_path:
        yaml_values, pipeline_options = _yaml_values(read_yaml(yaml_path), yaml_path)
    config = merge_config(flags, yaml_values, yaml_path, pipeline_options)
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
        renamed = [
            f"{f} is now {RENAMED[key]}"
            for f in flags
            if (key := f.lstrip("-").split("=")[0].replace("-", "_")) in RENAMED
        ]
        hint = f" ({'; '.join(renamed)})" if renamed else ""
        raise ConfigError(
            f"unknown option(s) {flags}{hint}: not a label-images option nor a Beam pipeline "
            "option (see label-images --help)"
        )


if __name__ == "__main__":
    print(option_table(), end="")
