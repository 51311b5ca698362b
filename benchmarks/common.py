"""Shared helpers: running our job in-process and reading its metrics."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.config import JobConfig
from pipelines.label_images import build, plan_job
from pipelines.output import prepare_output
from pipelines.runner import make_runner


@dataclass(frozen=True)
class JobTiming:
    images: int
    wall_s: float
    load_s: float  # model load (and label bank) time reported by RunInference

    @property
    def images_per_s(self) -> float:
        """End to end, model load included."""
        return self.images / self.wall_s

    @property
    def steady_images_per_s(self) -> float:
        """Model load excluded, as for a long job where it is amortized."""
        return self.images / max(self.wall_s - self.load_s, 1e-9)


def run_job(config: JobConfig, beam_args: list[str] | None = None) -> JobTiming:
    """Run the labeling job in this process and time it."""
    plan = plan_job(config)
    options = PipelineOptions(beam_args or [])
    started = time.time()
    pipeline = beam.Pipeline(runner=make_runner(options), options=options)
    output = prepare_output(config.output, overwrite=config.overwrite)
    build(pipeline, plan, output=output, started_at=started)
    result = pipeline.run()
    result.wait_until_finish()
    wall = time.time() - started
    load_ms = 0.0
    try:
        for dist in result.metrics().query()["distributions"]:
            if dist.key.metric.name == "load_model_latency_milli_secs":
                load_ms = max(load_ms, float(dist.committed.max or 0))
    except Exception:  # metrics are best effort on some runners
        pass
    rows = sum(1 for _ in Path(config.output).glob("part-*.parquet"))
    assert rows, "the job wrote no output"
    return JobTiming(images=_count_ok(config.output), wall_s=wall, load_s=load_ms / 1000.0)


def _count_ok(output: str) -> int:
    import pyarrow.parquet as pq

    files = sorted(str(p) for p in Path(output).glob("part-*.parquet"))
    table = pq.ParquetDataset(files).read(columns=["status"])
    return sum(1 for s in table.column("status").to_pylist() if s == "ok")


def fresh_output() -> str:
    return tempfile.mkdtemp(prefix="bench-out-")


def describe_machine() -> str:
    import platform

    import torch

    return (
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )


def fmt(value: float) -> str:
    return f"{value:8.2f}"


def table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def run_cli_job(args: list[str], prefix: str = "bench-") -> tuple[float, Path]:
    """`python -m pipelines.label_images ARGS --output <fresh dir>` in a fresh process, as a
    user runs it: (wall seconds from process start, output directory).

    Raises:
        RuntimeError: the job failed (with the end of its stderr).
    """
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = Path(tempfile.mkdtemp(prefix=prefix)) / "out"
    cmd = [sys.executable, "-m", "pipelines.label_images", *args, "--output", str(out)]
    cmd += ["--progress", "false"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the job failed:\n{proc.stderr[-3000:]}")
    return wall, out
