"""A quiet first run: only our own lines by default; `--verbose` brings the rest back."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import logging, sys
import pipelines.logs as logs
logs.hold()
logging.warning("import chatter")  # as Beam's 'apitools not found' does
logging.getLogger("apache_beam.io").warning("beam at import")
logs.release()
logs.setup(verbose=sys.argv[1] == "verbose")
logging.getLogger("transforms.x").info("our info")
logging.getLogger("transforms.x").warning("our warning")
logging.getLogger("apache_beam.io").warning("beam later")
logging.getLogger("transformers.modeling").error("library error")
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_library_chatter_is_held_and_dropped_unless_verbose(mode: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, cwd=REPO, check=True
    )
    said = {
        m
        for m in ("import chatter", "beam at import", "our info", "beam later")
        if m in proc.stderr
    }
    assert "our warning" in proc.stderr and "library error" in proc.stderr
    assert said == (
        set() if mode == "quiet" else {"import chatter", "beam at import", "our info", "beam later"}
    )


#: Every line a default run may print: progress, the summary, paths, the JSON line.
OURS = [
    r"\d+/\d+ images \(\d+%\) · .*",
    r"\d+ images · .*",
    r"Labeled \d+ of \d+ rows .*",
    r"Top labels: .*",
    r"Errors: .*",
    r"(Output|Summary|Report): .*",
    r'\{"label_images_summary": .*\}',
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["multi_threading", "multi_processing"])
def test_a_default_run_prints_only_our_lines(
    mode: str, photo_dir: Path, tiny_vit: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{photo_dir / 'chelsea.jpg'}\n{photo_dir / 'nope.jpg'}\n")
    args = ["--input", str(manifest), "--output", str(tmp_path / "out"), "--model", str(tiny_vit)]
    args += ["--direct_num_workers", "2", "--direct_running_mode", mode]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    foreign = [line for line in lines if not any(re.fullmatch(p, line) for p in OURS)]
    assert not foreign, foreign
    assert any(line.startswith("Summary: ") for line in lines)
    verbose = run_cli([*args[:3], str(tmp_path / "verbose"), *args[4:], "--verbose"])
    assert verbose.returncode == 0
    assert " INFO " in verbose.stderr  # our INFO lines and the libraries' are back
