"""What a run prints: our own lines by default, the libraries' too with `--verbose`.

By default a run prints its progress, the summary, the paths it wrote, warnings
and errors, and the final JSON line. Library chatter is off: Beam's import-time
"apitools not found" warning, transformers' "Loading weights" bar and backend
notes, and our own INFO lines (batch-norm folding, resume counts). Errors of
any library still pass. `--verbose` brings everything back, the records held
during the imports included.

An entry point calls `hold()` before its heavy imports and `release()` after
them: Beam logs through the root logger at import time, which would also make
the root logger print everything in Python's default format.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

#: Loggers of ours: INFO with --verbose, WARNING otherwise.
OURS = ("pipelines", "transforms", "benchmarks")
#: Libraries whose INFO and WARNING lines are chatter to a user of the CLI.
LIBRARIES = (
    "apache_beam",
    "transformers",
    "huggingface_hub",
    "datasets",
    "torch",
    "timm",
    "urllib3",
    "fsspec",
    "gcsfs",
    "google",
    "PIL",
    "absl",
    "filelock",
)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Records held during the imports (bounded: a flood is dropped, not kept).
HELD_RECORDS = 200

_held = logging.handlers.MemoryHandler(HELD_RECORDS, flushLevel=logging.CRITICAL + 1)
_records: list[logging.LogRecord] = []


def hold() -> None:
    """Hold what the root logger gets during an entry point's imports."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(_held)


def release() -> None:
    """Stop holding: a library importing the entry point keeps Python's defaults."""
    root = logging.getLogger()
    if _held in root.handlers:
        root.removeHandler(_held)
        _records.extend(_held.buffer)
        _held.buffer.clear()


class _Ours(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """The CLI's handler on the root logger (installed once)."""


def setup(verbose: bool = False) -> None:
    """Set what a CLI run prints (see the module docstring). Safe to call again.

    Loggers a host application configured (a root logger with handlers of its
    own, pytest's capture) keep their handlers; only levels are set.
    """
    release()
    root = logging.getLogger()
    if not root.handlers:
        handler = _Ours(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in OURS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    # transformers keeps its own handler and verbosity, and draws tqdm bars while it
    # loads weights; workers started later (multi_processing) read the environment.
    os.environ["TRANSFORMERS_VERBOSITY"] = "info" if verbose else "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0" if verbose else "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if verbose:
            hf_logging.set_verbosity_info()
            hf_logging.enable_progress_bar()
        else:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
    held, _records[:] = list(_records), []
    for record in held:  # what the imports said, when it matters now
        if verbose or record.levelno >= logging.ERROR:
            logging.getLogger(record.name).handle(record)
