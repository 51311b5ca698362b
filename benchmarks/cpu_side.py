"""The CPU side of a labeling job, as a GPU worker's vCPUs see it.

With the forward pass on a GPU, what a worker can label is what its CPUs can
fetch, decode, preprocess and move through the pipeline. This benchmark runs
our job with a near-free model (a one-layer ViT with 32-px patches behind a
real 224-px ConvNext processor: about 0.4 ms of CPU per image) at the GPU
default batch size (64, what `--device auto` runs on a GPU worker) on
ImageNet-like photos and on the mixed corpus, and, in the same run, the limits
it is held to:

- the stage limit: decode plus the model's processor on all cores, no Beam;
- the decode-only limit: decode on all cores.

Each system is a whole fresh process; CPU utilization is its CPU time over
wall time and cores. It prints, per corpus, images/s (steady: from the pipeline
start, as summary.json's `steady_images_per_s`; whole: from process start),
the ratios to the stage limit, and the goals:

- CPU side >= 0.8x the stage limit, steady, at 3,000 ImageNet-like photos;
- the whole process >= 0.6x the stage limit at 10,000 photos.

    python -m benchmarks.cpu_side [--images 3000] [--long 10000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.output import SUMMARY_FILE  # noqa: E402

#: Daft's published figure for this shape (ResNet18, 8 x g6.xlarge: one L4 and 4 vCPUs
#: each), per L4 GPU; a projection from it is marked as one.
DAFT_PER_L4 = 380.0
L4_WORKER_VCPUS = 4


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    """Run a command; (wall s, CPU s of it and its children, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def run_ours(model: str, manifest: str) -> dict[str, float]:
    from transforms.model.batching import DEFAULT_GPU_BATCH_SIZE

    out = Path(tempfile.mkdtemp(prefix="bench-cpu-side-")) / "out"
    cmd = [sys.executable, "-m", "pipelines.label_images", "--input", manifest]
    cmd += ["--output", str(out), "--model", model, "--progress", "false", "--report", "false"]
    # As on a GPU worker, where the near-free model stands for the GPU's forward
    # pass: batches of the GPU default, not of the CPU one.
    cmd += ["--batch-size", str(DEFAULT_GPU_BATCH_SIZE)]
    wall, cpu, _ = _timed(cmd)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    ok = summary["rows_by_status"]["ok"]
    return {
        "steady": summary["steady_images_per_s"],
        "whole": ok / wall,
        "cpu_util": cpu / wall / (os.cpu_count() or 1),
        "cpu_ms_per_image": 1000 * cpu / ok,
    }


_LIMIT = """
import os, sys, time
from concurrent.futures import ThreadPoolExecutor
from transforms.images.decode import decode_image
from transforms.fetch_decode import single_threaded_torch_in_this_thread
from transforms.model.loading import ModelSpec
from transforms.model.preprocess import ImagePreprocessor
model, manifest, mode = sys.argv[1:4]
paths = [line for line in open(manifest).read().splitlines() if line]
pre = ImagePreprocessor(ModelSpec(model))
pre.setup()
def load(path):
    with open(path, "rb") as f:
        image = decode_image(f.read())
    return image if mode == "decode" else pre.pixel_values([image])[0]
with ThreadPoolExecutor(os.cpu_count(), initializer=single_threaded_torch_in_this_thread) as pool:
    list(pool.map(load, paths[:32]))  # warm-up
    start = time.perf_counter()
    done = sum(1 for _ in pool.map(load, paths))
    print("BENCH_RATE", done / (time.perf_counter() - start))
"""


def run_limit(model: str, manifest: str, mode: str) -> dict[str, float]:
    wall, cpu, stdout = _timed([sys.executable, "-c", _LIMIT, model, manifest, mode])
    rate = float(next(x for x in stdout.splitlines() if x.startswith("BENCH_RATE")).split()[1])
    return {"rate": rate, "cpu_util": cpu / wall / (os.cpu_count() or 1)}


def bench_corpus(kind: str, images: int, rounds: int, model: str, root: Path) -> dict[str, Any]:
    from benchmarks.corpus import build_corpus, write_manifest

    manifest = str(
        write_manifest(build_corpus(images, kind=kind), root / f"cpu-{kind}-{images}.txt")
    )
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "stage": [], "decode": []}
    for _ in range(rounds):  # interleaved, so a drifting machine moves all three
        runs["ours"].append(run_ours(model, manifest))
        runs["stage"].append(run_limit(model, manifest, "stage"))
        runs["decode"].append(run_limit(model, manifest, "decode"))

    def median(kind_: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind_])

    return {
        "corpus": kind,
        "images": images,
        "rounds": rounds,
        "runs": runs,
        "steady": median("ours", "steady"),
        "whole": median("ours", "whole"),
        "ours_cpu_util": median("ours", "cpu_util"),
        "ours_cpu_ms_per_image": median("ours", "cpu_ms_per_image"),
        "stage": median("stage", "rate"),
        "stage_cpu_util": median("stage", "cpu_util"),
        "decode": median("decode", "rate"),
        "decode_cpu_util": median("decode", "cpu_util"),
    }


def print_result(r: dict[str, Any]) -> None:
    from benchmarks.common import table

    cores = os.cpu_count() or 1
    rows = [
        ("corpus, images, rounds", f"{r['corpus']}, {r['images']}, {r['rounds']}"),
        (
            "ours, near-free model: steady / whole process",
            f"{r['steady']:7.1f} / {r['whole']:7.1f} img/s   CPU {r['ours_cpu_util']:.0%}, "
            f"{r['ours_cpu_ms_per_image']:.1f} ms CPU per image (start-up included)",
        ),
        (
            "stage limit: decode + processor, all cores, no Beam",
            f"{r['stage']:7.1f} img/s   CPU {r['stage_cpu_util']:.0%}",
        ),
        (
            "decode-only limit, all cores",
            f"{r['decode']:7.1f} img/s   CPU {r['decode_cpu_util']:.0%}",
        ),
        ("steady / stage limit", f"{r['steady'] / r['stage']:5.2f}x"),
        ("whole process / stage limit", f"{r['whole'] / r['stage']:5.2f}x"),
        (
            f"CPU side per vCPU (steady / {cores})",
            f"{r['steady'] / cores:7.1f} img/s; a {L4_WORKER_VCPUS}-vCPU L4 worker: "
            f"{r['steady'] / cores * L4_WORKER_VCPUS:.0f} img/s (projection; Daft published "
            f"{DAFT_PER_L4:.0f} per L4)",
        ),
    ]
    print(f"\n== CPU side, {r['corpus']} corpus ==")
    print(table(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--long", type=int, default=10000, help="images of the whole-process goal")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--corpora", default="imagenet,mixed")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    from benchmarks.common import describe_machine
    from transforms.model.default_model import cache_root

    root = cache_root() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    from benchmarks.throughput import build_model

    model = build_model("near_free_vit", root / "models")
    print(f"Machine: {describe_machine()}")
    results: dict[str, Any] = {"machine": describe_machine(), "corpora": []}
    for kind in args.corpora.split(","):
        result = bench_corpus(kind, args.images, args.rounds, model, root)
        results["corpora"].append(result)
        print_result(result)
    goals = []
    first = results["corpora"][0]
    goals.append(("CPU side steady / stage limit", first["steady"] / first["stage"], 0.8))
    if args.long:
        long = bench_corpus(args.corpora.split(",")[0], args.long, 1, model, root)
        results["long"] = long
        print_result(long)
        goals.append(
            (f"whole process / stage limit at {args.long}", long["whole"] / long["stage"], 0.6)
        )
    print("\n  goals:")
    for name, value, target in goals:
        print(
            f"    {'MET ' if value >= target else 'MISS'}  {name}: {value:.2f} (goal >= {target})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
