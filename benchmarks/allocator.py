"""The malloc lever (`transforms/allocator.py`), measured in fresh processes.

(1) forward only: HF MobileNetV2 (random weights, batch norms folded and static
padding as the handler runs it, channels_last, batch 4) with and without the
thresholds, interleaved over `--rounds`; (2) the default job end to end on the
mixed-size corpus with `--tune-malloc true` and `false`, interleaved too.
Prints images/s per run and the median ratios.

    python -m benchmarks.allocator [--images 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import describe_machine, run_cli_job, table  # noqa: E402
from benchmarks.corpus import build_corpus, write_manifest  # noqa: E402
from transforms.model.default_model import cache_root  # noqa: E402

_FORWARD = r"""
import sys, time, torch
from transforms.allocator import tune_malloc
if sys.argv[1] == "on":
    assert tune_malloc()
from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
from transforms.model.image_classification import streamline_classifier
torch.manual_seed(0)
model = MobileNetV2ForImageClassification(MobileNetV2Config()).eval()
streamline_classifier(model, "cpu")
model.to(memory_format=torch.channels_last)
x = torch.rand(4, 3, 224, 224).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(10):
        model(pixel_values=x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 8:
        model(pixel_values=x)
        n += 4
print("RATE", n / (time.perf_counter() - start))
"""


def forward_rate(mode: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _FORWARD, mode],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=True,
    ).stdout
    return float(out.split("RATE")[1])


def job_rate(manifest: Path, tune: bool, images: int) -> float:
    args = ["--input", str(manifest), "--report", "false", "--tune-malloc", str(tune)]
    wall, _ = run_cli_job(args, prefix="bench-malloc-")
    return images / wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"Machine: {describe_machine()}")
    runs: dict[str, list[float]] = {"fwd off": [], "fwd on": [], "job off": [], "job on": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            runs[f"fwd {mode}"].append(forward_rate(mode))
    manifest = write_manifest(
        build_corpus(args.images), cache_root() / f"bench-malloc-{args.images}.txt"
    )
    for _ in range(args.rounds):
        for tune in (False, True):
            runs[f"job {'on' if tune else 'off'}"].append(job_rate(manifest, tune, args.images))
    med = {k: statistics.median(v) for k, v in runs.items()}
    rows = [
        (k, f"{med[k]:.1f} images/s  (runs: {[round(x, 1) for x in v]})") for k, v in runs.items()
    ]
    rows.append(("forward on/off", f"{med['fwd on'] / med['fwd off']:.2f}x"))
    rows.append(("job on/off (process start to exit)", f"{med['job on'] / med['job off']:.2f}x"))
    print(table(rows))


if __name__ == "__main__":
    main()
