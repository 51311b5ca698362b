"""Several models in one pass: the `models:` list and its entries.

A job (or `LabelImages`, `classify`) given `models` labels each image with
every model in the list: each image is fetched and decoded once, each distinct
preprocessing runs once, and the models run one after the other on the same
rows. Each entry has a `name` and that model's options (any `LabelingSpec`
option that is not `shared`); the options given outside the list are every
entry's defaults. The options of the whole pass (fetch, decode, device,
threads: `OptionInfo.shared`) may only be given outside it.

    models:
      - name: cls
        model: default
        top_k: 5
      - name: tags
        model: ./siglip
        candidate_labels_file: tags.txt
        threshold: 0.3
        embeddings: true

On the command line, each `--models` value is one entry, as space-separated
``key=value`` pairs with shell quoting (``--models 'name=tags model=./siglip
candidate_labels="a cat,a dog"'``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transforms.options import ConfigError, OptionInfo, default_of, flag, option_fields
from transforms.rows import ModelColumns
from transforms.spec import LabelingSpec

#: A model's name: the prefix of its output columns (`<name>_label` ...).
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: The models of one pass, at most (each is loaded on every worker).
MAX_MODELS = 8


@dataclass(frozen=True)
class NamedSpec:
    """One model of a pass: its name (None for the single model of a job
    without `models:`, whose columns are unprefixed) and its options."""

    name: str | None
    spec: LabelingSpec


def _entry_where(index: int, entry: Mapping[str, Any]) -> str:
    name = entry.get("name")
    return f"models[{index}]" + (f" ({name})" if isinstance(name, str) and name else "")


def _cli_entry(value: str) -> dict[str, Any]:
    """One `--models` value: ``"name=cls model=default top_k=5"``."""
    try:
        words = shlex.split(value)
    except ValueError as e:
        raise ValueError(f"cannot be split into key=value pairs ({e})") from None
    entry: dict[str, Any] = {}
    for word in words:
        key, sep, item = word.partition("=")
        if not sep or not key:
            raise ValueError(f"has {word!r}; write each option as key=value")
        entry[key] = item
    return entry


def model_entries(value: Any) -> tuple[dict[str, Any], ...]:
    """Parse the `models` option: a list of mappings (YAML, Python) or of
    ``key=value`` strings (the CLI), into entries with underscore keys. Checks
    their shape and names; their options are checked by `named_specs`."""
    if isinstance(value, (str, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("must be a list of models, each with a name and its options")
    entries: list[dict[str, Any]] = []
    for index, raw in enumerate(value):
        item = _cli_entry(raw) if isinstance(raw, str) else raw
        if not isinstance(item, Mapping):
            raise ValueError(f"entry {index} must be a mapping of option: value")
        entry = {str(k).replace("-", "_"): v for k, v in item.items()}
        name = entry.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"entry {index} needs a name of lowercase letters, digits and '_' "
                f"(starting with a letter, at most 32), not {name!r}"
            )
        entries.append(entry)
    names = [e["name"] for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"names must be distinct; {twice} appear twice")
    if len(entries) > MAX_MODELS:
        raise ValueError(f"may hold at most {MAX_MODELS} models, not {len(entries)}")
    return tuple(entries)


def model_columns(models: Sequence[NamedSpec]) -> tuple[ModelColumns, ...]:
    """The output columns of a pass's models: none for a single unnamed one."""
    return tuple(ModelColumns(m.name, m.spec.embeddings) for m in models if m.name is not None)


def spec_values(spec: LabelingSpec) -> dict[str, Any]:
    """The options of a spec that differ from their defaults."""
    return {
        f.name: getattr(spec, f.name)
        for f, _ in option_fields(LabelingSpec)
        if getattr(spec, f.name) != default_of(f)
    }


def shared_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The options of the whole pass among `values` (`OptionInfo.shared`)."""
    shared = {f.name for f, info in option_fields(LabelingSpec) if info.shared}
    return {k: v for k, v in values.items() if k in shared}


def named_specs(
    defaults: Mapping[str, Any], entries: Sequence[Mapping[str, Any]] = ()
) -> tuple[NamedSpec, ...]:
    """The models of a pass: one unnamed spec of `defaults` without entries,
    else one spec per entry: `defaults` with the entry's options over them.

    Args:
        defaults: labeling options given outside the list (raw or parsed).
        entries: `model_entries` output.

    Raises:
        ConfigError: naming the entry (``models[1] (tags): --top-k ...``).
    """
    if not entries:
        return (NamedSpec(None, LabelingSpec(**defaults)),)
    infos = {f.name: info for f, info in option_fields(LabelingSpec)}
    model_options = sorted(name for name, info in infos.items() if not info.shared)
    specs = []
    for index, entry in enumerate(entries):
        where = _entry_where(index, entry)
        options = {k: v for k, v in entry.items() if k != "name"}
        for key in options:
            if key not in infos:
                raise ConfigError(
                    f"{where}: unknown option {key!r}; a model takes name and {model_options}"
                )
            if infos[key].shared:
                raise ConfigError(
                    f"{where}: {key} ({flag(key)}) applies to the whole pass (each image is "
                    "fetched and decoded once for every model); set it outside models"
                )
        merged = dict(defaults)
        # An entry's labels replace the defaults' labels, given either way.
        if "candidate_labels" in options or "candidate_labels_file" in options:
            merged.pop("candidate_labels", None)
            merged.pop("candidate_labels_file", None)
        merged.update(options)
        try:
            spec = LabelingSpec(**merged)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        specs.append(NamedSpec(str(entry["name"]), spec))
    return tuple(specs)


#: The `models` option, declared once: `JobConfig.models` (flag and YAML key)
#: and the `models=` keyword of `LabelImages` and `classify`.
MODELS_OPTION = OptionInfo(
    parse=model_entries,
    help="several models in one pass (each image fetched and decoded once): one entry per "
    "model, a name and that model's options (the labeling options given outside it are "
    "every entry's defaults); columns take the name (cls_label ...). YAML: a list of "
    "mappings (README, 'Several models'); CLI: repeat it, as key=value pairs",
    metavar="'name=NAME key=value ...'",
    repeatable=True,
)
