"""Packaging for Dataflow: sdist/wheel contents, the Dockerfile's pins, configs."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import tomllib

from pipelines.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("<!-- test-command -->", 1)[1].split("<!-- /test-command -->", 1)[0]


def test_dockerfile_pins_agree_with_the_project() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    beam_tag = re.search(r"ARG BEAM_VERSION=(\S+)", dockerfile)
    base = re.search(r"FROM apache/beam_python(\d)\.(\d+)_sdk:\$\{BEAM_VERSION\}", dockerfile)
    assert beam_tag and base, "the Dockerfile must build FROM apache/beam_pythonX.Y_sdk"
    deps = _pyproject()["project"]["dependencies"]
    beam_pin = next(d for d in deps if d.startswith("apache-beam"))
    assert beam_pin == f"apache-beam=={beam_tag.group(1)}", (beam_pin, beam_tag.group(1))
    gcp = _pyproject()["project"]["optional-dependencies"]["gcp"]
    assert f"apache-beam[gcp]=={beam_tag.group(1)}" in gcp
    # The image's Python must be one the project supports, and the one CI uses.
    assert f"{base.group(1)}.{base.group(2)}" == f"{sys.version_info[0]}.{sys.version_info[1]}"
    # torch/torchvision: the same pair as the README's commands and CI.
    for package in ("torch", "torchvision"):
        docker_pin = re.search(rf'"{package}==([^"]+)"', dockerfile)
        readme_pin = re.search(rf"\b{package}==(\S+)", _readme_test_command())
        assert docker_pin and readme_pin and docker_pin.group(1) == readme_pin.group(1)
    assert "COPY pipelines" in dockerfile and "COPY transforms" in dockerfile
    assert "COPY configs" in dockerfile
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in dockerfile


@pytest.mark.parametrize("name", ["local.yaml", "dataflow-cpu.yaml", "dataflow-gpu.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    config, beam_args = load_config(
        ["--config", str(REPO / "configs" / name), "--input", "in.txt", "--output", "out"]
    )
    if name.startswith("dataflow"):
        assert "--runner=DataflowRunner" in beam_args
        assert any(a.startswith("--machine_type=") for a in beam_args)
        assert any(a.startswith("--max_num_workers=") for a in beam_args)
        assert any(a.startswith("--disk_size_gb=") for a in beam_args)
    if name == "dataflow-gpu.yaml":
        assert config.labeling.device == "cuda" and config.labeling.model_copies == 1
        assert any(
            "worker_accelerator=type:" in a and "install-nvidia-driver" in a for a in beam_args
        )


@pytest.mark.slow
def test_sdist_and_wheel_contain_the_packages_and_configs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--sdist",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # An SPDX `license` string: setuptools prints no license deprecation banner.
    banners = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if "deprecat" in line.lower() and "licen" in line.lower()
    ]
    assert not banners, banners
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for required in (
        "pipelines/label_images.py",
        "pipelines/config.py",
        "transforms/api.py",
        "transforms/model/zero_shot.py",
        "configs/dataflow-gpu.yaml",
        "configs/dataflow-cpu.yaml",
        "configs/local.yaml",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    # Every module of every subpackage ships (a package list that misses one
    # breaks only on a Dataflow worker).
    modules = {
        str(p.relative_to(REPO))
        for d in ("pipelines", "transforms")
        for p in (REPO / d).rglob("*.py")
    }
    assert len(modules) > 40
    assert modules <= set(names), sorted(modules - set(names))
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "label-images = pipelines.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    sdist = next(tmp_path.glob("*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    for required in (
        "pyproject.toml",
        "pipelines/label_images.py",
        "transforms/api.py",
        "configs/dataflow-cpu.yaml",
    ):
        assert required in members, f"{required} missing from {sdist.name}"
