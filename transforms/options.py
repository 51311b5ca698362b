"""How an option is declared, once: its type, default, check and help text.

Each option of a labeling job is one dataclass field made with `option(...)`.
The CLI flags and YAML keys (`pipelines/config.py`), `LabelImages(**options)`
and `classify(**options)` are all generated from these fields, and every entry
point runs the same parser on a value, so they accept the same options and
refuse the same mistakes with the same message.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OPTION = "image_labeler.option"


class ConfigError(ValueError):
    """A bad option. The message names the option and says what is expected."""


@dataclass(frozen=True)
class OptionInfo:
    """The metadata of one option field.

    Attributes:
        parse: turns a CLI/YAML string or a Python value into the typed value;
            raises ValueError (or TypeError) with what is expected.
        help: the help text of the flag (and the docs of the keyword).
        metavar: the flag's value placeholder.
        switch: a flag without a value (`--overwrite`); YAML takes true/false.
        repeatable: the flag may be given several times (a list).
        path: a file or directory path; a YAML config's relative value resolves
            against the config file's folder.
        shared: a labeling option of the whole pass (fetch, decode, device,
            threads), not of one model: an entry of `models:` may not set it.
    """

    parse: Callable[[Any], Any]
    help: str
    metavar: str | None = None
    switch: bool = False
    repeatable: bool = False
    path: bool = False
    shared: bool = False


def option(
    default: Any,
    parse: Callable[[Any], Any],
    help: str,
    metavar: str | None = None,
    *,
    switch: bool = False,
    repeatable: bool = False,
    path: bool = False,
    shared: bool = False,
) -> Any:
    """A dataclass field that is a job option (see `OptionInfo`)."""
    info = OptionInfo(parse, help, metavar, switch, repeatable, path, shared)
    return dataclasses.field(default=default, metadata={OPTION: info})


def flag(name: str) -> str:
    """The CLI flag of an option name: ``top_k`` -> ``--top-k``."""
    return "--" + name.replace("_", "-")


def option_fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], OptionInfo]]:
    """The option fields of a dataclass, in declaration order."""
    for f in dataclasses.fields(cls):
        info = f.metadata.get(OPTION)
        if info is not None:
            yield f, info


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def parse_value(name: str, info: OptionInfo, value: Any) -> Any:
    """Parse one value of option `name`; None stays None.

    Raises:
        ConfigError: ``"--top-k (top_k): -1 must be >= 0"``, the same text
            whichever entry point the value came from.
    """
    if value is None:
        return None
    try:
        return info.parse(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{flag(name)} ({name}): {_show(value)!r} {e}") from None


def parse_fields(obj: Any) -> None:
    """Parse every option field of a frozen dataclass instance in place."""
    for f, info in option_fields(type(obj)):
        value = getattr(obj, f.name)
        if value is not None and value != default_of(f):
            object.__setattr__(obj, f.name, parse_value(f.name, info, value))


def check_keywords(cls: type, given: Mapping[str, Any], where: str) -> None:
    """Refuse keyword arguments that are not options of `cls`, naming them."""
    known = {f.name for f, _ in option_fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(
            f"{where} got unknown option(s) {unknown}; known options are {sorted(known)}"
        )


# ---- parsers: each takes a CLI/YAML string or a Python value -----------------------


def _int(value: Any) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError("must be an integer")
    try:
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ValueError("must be an integer") from None


def positive_int(value: Any) -> int:
    number = _int(value)
    if number < 1:
        raise ValueError("must be an integer >= 1")
    return number


def non_negative_int(value: Any) -> int:
    number = _int(value)
    if number < 0:
        raise ValueError("must be an integer >= 0")
    return number


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None


def positive_float(value: Any) -> float:
    number = _float(value)
    if not number > 0:
        raise ValueError("must be a number > 0")
    return number


def rate(value: Any) -> float:
    number = _float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError("must be a number between 0 and 1")
    return number


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def choice(choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"must be one of {list(choices)}")
        return value

    return parse


def lower_list(value: Any) -> tuple[str, ...]:
    """A comma-separated string or a list, lower-cased: ``"gs,https"``."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    parsed = tuple(str(item).strip().lower() for item in items if str(item).strip())
    if not parsed:
        raise ValueError("must name at least one value")
    return parsed


def label_list(value: Any) -> tuple[str, ...]:
    """Labels from a list, or from a comma-separated string with CSV quoting
    (``'cat,"hot dog, grilled",car'``)."""
    if isinstance(value, (list, tuple)):
        return tuple(str(item).strip() for item in value)
    if not isinstance(value, str):
        raise ValueError("must be a list of labels or a comma-separated string")
    rows = list(csv.reader([value], skipinitialspace=True))
    return tuple(item.strip() for item in rows[0]) if rows else ()


def str_list(value: Any) -> tuple[str, ...]:
    """One string or a list of strings (a repeatable flag)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("needs at least one value")
        return tuple(str(item) for item in value)
    return (str(value),)
