"""Tier 1: one config, one set of checks, every entry point.

Every option is walked: the CLI, a YAML config and the Python API
(`LabelingSpec`, `LabelImages`, `classify`) must agree on its default and
refuse the same bad value with the same message. Configuration mistakes exit 2
with one line, before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.config import RENAMED, JobConfig, all_options, build_arg_parser, load_config
from pipelines.label_images import EXIT_BAD_CONFIG, run
from pipelines.output import SUMMARY_FILE
from transforms.options import ConfigError, OptionInfo, default_of, flag
from transforms.spec import LabelingSpec

REPO = Path(__file__).resolve().parents[1]
BASE = ["--input", "in.txt", "--output", "out"]
#: Values tried as mistakes; each option must refuse at least one of them.
CANDIDATES = ("-1", "0", "many", "maybe", "", "2.5", "a b/c")


def _field(cls: type, name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _api(cls: type, name: str, value: Any) -> Any:
    if cls is LabelingSpec:
        return LabelingSpec(**{name: value})
    return JobConfig(**{"input": "in.txt", "output": "out", name: value})


def _message(call: Any) -> str | None:
    try:
        call()
    except ConfigError as e:
        return str(e)
    return None


def _yaml(tmp_path: Path, values: dict[str, Any]) -> list[str]:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["--config", str(path)]


OPTIONS = list(all_options())
HELP = " ".join(build_arg_parser().format_help().split())


@pytest.mark.parametrize(("name", "info", "cls"), OPTIONS, ids=[o[0] for o in OPTIONS])
def test_every_option_has_one_default_everywhere(
    name: str, info: OptionInfo, cls: type, tmp_path: Path
) -> None:
    default = default_of(_field(cls, name))
    if name in ("input", "output"):  # required: no default to agree on
        assert default is None
        return
    config, _ = load_config(BASE)
    from_cli = getattr(config.labeling if cls is LabelingSpec else config, name)
    assert from_cli == default
    if cls is LabelingSpec:
        assert getattr(LabelingSpec(), name) == default
        # The YAML spelling of the default gives the same value.
        if default is not None:
            value = list(default) if isinstance(default, tuple) else default
            config, _ = load_config(_yaml(tmp_path, {name: value}) + BASE)
            assert getattr(config.labeling, name) == default
    # The flag and its help come from the same field.
    assert info.help and flag(name) in HELP and " ".join(info.help.split())[:30] in HELP


@pytest.mark.parametrize(("name", "info", "cls"), OPTIONS, ids=[o[0] for o in OPTIONS])
def test_every_option_refuses_the_same_mistake_with_the_same_message(
    name: str, info: OptionInfo, cls: type, tmp_path: Path
) -> None:
    refused = 0
    for bad in CANDIDATES:
        api = _message(lambda bad=bad: _api(cls, name, bad))
        values = {"input": "in.txt", "output": "out", name: bad}
        yaml_message = _message(lambda values=values: load_config(_yaml(tmp_path, values)))
        if api is None:
            assert yaml_message is None, (name, bad)
            continue
        refused += 1
        assert flag(name) in api, api
        assert yaml_message == api
        if not info.switch:
            cli = _message(lambda bad=bad: load_config([*BASE, f"{flag(name)}={bad}"]))
            assert cli == api
    assert refused >= 1, f"no candidate value is refused by {name}"


def test_label_images_and_classify_refuse_with_the_spec_message(tiny_vit: Path) -> None:
    from transforms.api import LabelImages, classify

    expected = _message(lambda: LabelingSpec(top_k=-1))
    assert expected == "--top-k (top_k): '-1' must be an integer >= 0"
    assert _message(lambda: LabelImages(model=str(tiny_vit), top_k=-1)) == expected
    assert _message(lambda: classify(b"", model=str(tiny_vit), top_k=-1)) == expected
    assert _message(lambda: load_config([*BASE, "--top-k", "-1"])) == expected
    with pytest.raises(TypeError, match="topk"):
        LabelImages(model=str(tiny_vit), topk=3)
    with pytest.raises(TypeError, match="topk"):
        classify(b"", topk=3)


@pytest.mark.parametrize(
    "options",
    [
        {"precision": "fp16", "device": "cpu"},
        {"quantize": "int8", "precision": "bf16"},
        {"batch_size": 2, "min_batch_size": 4},
        {"revision": "main"},
        {"candidate_labels": ("a",), "task": "image-classification"},
        {"candidate_labels": ("a",)},  # the default model is no CLIP
        {"task": "zero-shot-image-classification", "model": "m"},
    ],
)
def test_combinations_are_refused_alike_by_cli_and_api(options: dict[str, Any]) -> None:
    api = _message(lambda: LabelingSpec(**options))
    assert api is not None
    argv = list(BASE)
    for name, value in options.items():
        argv += [flag(name), ",".join(value) if isinstance(value, tuple) else str(value)]
    assert _message(lambda: load_config(argv)) == api


def test_renamed_option_says_what_to_use(tmp_path: Path) -> None:
    assert "jpeg_draft" in RENAMED
    message = _message(lambda: load_config([*BASE, "--jpeg-draft", "true"]))
    assert message is not None and "--fast-decode" in message
    message = _message(lambda: load_config(_yaml(tmp_path, {"jpeg_draft": True}) + BASE))
    assert message is not None and "--fast-decode" in message


def test_shipped_configs_load_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Globbed from this file's location (not the working directory), and their
    relative paths resolve against the config file."""
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) == 3
    monkeypatch.chdir(tmp_path)
    for path in configs:
        config, beam_args = load_config(["--config", str(path), *BASE])
        assert config.config == str(path)
        for arg in beam_args:
            if arg.startswith("--setup_file="):
                setup = Path(arg.split("=", 1)[1])
                assert setup == REPO / "pyproject.toml" and setup.exists()


def test_yaml_paths_resolve_against_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    model = folder / "models" / "m"
    model.mkdir(parents=True)
    (folder / "job.yaml").write_text(
        "input: photos/list.txt\noutput: ../out\nmodel: models/m\n"
        "pipeline_options:\n  setup_file: ../pyproject.toml\n"
    )
    monkeypatch.chdir(REPO)
    config, beam_args = load_config(["--config", str(folder / "job.yaml")])
    assert config.input == str(folder / "photos" / "list.txt")
    assert config.output == str(tmp_path / "out")
    assert config.labeling.model == str(model)
    assert f"--setup_file={tmp_path / 'pyproject.toml'}" in beam_args
    # A model name that is no folder beside the config stays a hub id.
    (folder / "hub.yaml").write_text("input: i\noutput: o\nmodel: org/name\n")
    config, _ = load_config(["--config", str(folder / "hub.yaml")])
    assert config.labeling.model == "org/name"


# ---- the exit-code contract ------------------------------------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run([*argv, "--progress", "false"], save_main_session=False)
    return code, capsys.readouterr().err.strip()


def _assert_one_line(err: str, *needles: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("label-images: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.fixture()
def manifest(photo_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "images.txt"
    path.write_text("\n".join(str(p) for p in sorted(photo_dir.glob("*.jpg"))) + "\n")
    return path


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--runner", "NoSuchRunner"], ("--runner NoSuchRunner",)),
        (["--device", "cuda"], ("--device cuda", "no CUDA device")),
        (["--precision", "fp16"], ("--precision fp16", "cpu")),
        (["--top-k", "-2"], ("--top-k",)),
        (["--input", "s3://bucket/list.txt"], ("s3fs",)),
    ],
)
def test_configuration_errors_exit_2_and_leave_output_alone(
    extra: list[str],
    needles: tuple[str, ...],
    manifest: Path,
    tiny_vit: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each mistake: exit 2, one line naming it, --output untouched; then the corrected
    command runs into the same --output without --overwrite (shown for two of them)."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "s3fs" else real_find_spec(name, *a),
    )
    out = tmp_path / "out"
    base = ["--input", str(manifest), "--output", str(out), "--model", str(tiny_vit)]
    code, err = _run([*base, *extra], capsys)
    assert code == EXIT_BAD_CONFIG
    _assert_one_line(err, *needles)
    assert not out.exists()
    if "--runner" in extra or "--device" in extra:
        code, err = _run(base, capsys)
        assert code == 0, err
        assert (out / SUMMARY_FILE).exists()


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare -n as root"
)
@pytest.mark.slow  # a subprocess in a fresh network namespace: ~5 s
def test_gs_input_without_credentials_fails_fast(tmp_path: Path) -> None:
    """In a network namespace with only loopback and no credentials anywhere, a gs://
    input is refused at startup in seconds (gcsfs alone retried for over a minute)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GOOGLE_", "GCE_", "STORAGE_EMULATOR", "CLOUDSDK_"))
    }
    env.update(HOME=str(tmp_path), HF_HUB_OFFLINE="1", CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
    script = (
        "ip link set lo up 2>/dev/null; exec "
        f"{sys.executable} -m pipelines.label_images --input gs://bucket/list.txt "
        f"--output {tmp_path / 'out'}"
    )
    start = time.monotonic()
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == EXIT_BAD_CONFIG, proc.stderr[-2000:]
    _assert_one_line(proc.stderr.strip(), "--input gs://bucket/list.txt", "credentials")
    assert elapsed < 30, elapsed
    assert not (tmp_path / "out").exists()


def test_the_readme_option_table_is_generated_from_the_declarations() -> None:
    """The README's table is `option_table()`: an option added, renamed or given a
    new default or help text without regenerating it (`python -m pipelines.config`)
    fails here."""
    from pipelines.config import option_table

    text = (REPO / "README.md").read_text()
    assert text.count("<!-- options -->") == 1 and text.count("<!-- /options -->") == 1
    block = text.split("<!-- options -->\n", 1)[1].split("<!-- /options -->", 1)[0]
    assert block == option_table()
    flags = [line.split("`")[1].split()[0] for line in block.splitlines()[3:]]
    assert flags == [flag(name) for name, _, _ in all_options()]
    assert len(flags) > 45
