"""Exact vs fast decoding: what `--fast-decode` buys and what it costs.

Runs the default job (the default model, EfficientNet-Lite0 with ImageNet
weights) over the mixed-size real-photo corpus (`benchmarks/corpus.py`: 50%
500x375, 30% 1024x768, 20% 3000x2000) in fresh processes, exact and fast
interleaved over `--rounds` rounds, whole processes with start-up included.
Then compares labels:

- fast against exact: top-1 agreement, identical top-5 lists, max score difference;
- both against `transformers.pipeline` on the first `--reference-images` images
  (exact must agree on 100%, scores within 1e-4).

    python -m benchmarks.decode [--images 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import describe_machine, run_cli_job, table  # noqa: E402
from benchmarks.corpus import build_corpus, write_manifest  # noqa: E402
from transforms.model.default_model import cache_root, default_model_dir  # noqa: E402

Labels = dict[str, tuple[list[str], list[float]]]


def run_job(manifest: Path, fast: bool) -> tuple[float, Labels]:
    """The default job in a fresh process; (images/s from process start, labels by URI)."""
    import pyarrow.parquet as pq

    args = ["--input", str(manifest)] + (["--fast-decode"] if fast else [])
    wall, out = run_cli_job(args, prefix="bench-decode-")
    files = sorted(str(p) for p in out.glob("part-*.parquet"))
    rows = pq.ParquetDataset(files).read(columns=["uri", "labels", "scores"]).to_pylist()
    labels = {r["uri"]: (r["labels"], r["scores"]) for r in rows if r["labels"]}
    return len(labels) / wall, labels


def compare(ours: Labels, reference: Labels) -> dict[str, float]:
    uris = [u for u in reference if u in ours]
    top1 = sum(ours[u][0][0] == reference[u][0][0] for u in uris)
    top5 = sum(ours[u][0] == reference[u][0] for u in uris)
    diff = max(
        (
            abs(score - dict(zip(*reference[u], strict=True)).get(label, 0.0))
            for u in uris
            for label, score in zip(*ours[u], strict=True)
            if label in reference[u][0]
        ),
        default=0.0,
    )
    return {"n": len(uris), "top1": top1 / len(uris), "top5": top5 / len(uris), "max_diff": diff}


def reference_labels(paths: list[Path]) -> Labels:
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(default_model_dir()), device="cpu")
    out: Labels = {}
    for path in paths:
        result = pipe(str(path), top_k=5)
        out[str(path)] = ([d["label"] for d in result], [d["score"] for d in result])
    return out


def _fmt(c: dict[str, Any]) -> str:
    return (
        f"top-1 {100 * c['top1']:.2f}%, identical top-5 {100 * c['top5']:.1f}%, "
        f"max score diff {c['max_diff']:.2g} (n={c['n']})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reference-images", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"Machine: {describe_machine()}")
    paths = build_corpus(args.images)
    manifest = write_manifest(paths, cache_root() / f"bench-decode-{args.images}.txt")
    speeds: dict[str, list[float]] = {"exact": [], "fast": []}
    labels: dict[str, Labels] = {}
    for _ in range(args.rounds):
        for mode in ("exact", "fast"):
            speed, labels[mode] = run_job(manifest, fast=mode == "fast")
            speeds[mode].append(speed)
    exact, fast = statistics.median(speeds["exact"]), statistics.median(speeds["fast"])
    reference = reference_labels(paths[: args.reference_images])
    rows = [
        ("images", f"{args.images} (mixed sizes), {args.rounds} rounds, interleaved"),
        ("exact (default), images/s", f"{exact:.1f}  (runs: {speeds['exact']})"),
        ("fast (--fast-decode), images/s", f"{fast:.1f}  (runs: {speeds['fast']})"),
        ("fast / exact", f"{fast / exact:.2f}x"),
        ("fast vs exact", _fmt(compare(labels["fast"], labels["exact"]))),
        ("exact vs transformers.pipeline", _fmt(compare(labels["exact"], reference))),
        ("fast vs transformers.pipeline", _fmt(compare(labels["fast"], reference))),
    ]
    print(table(rows))


if __name__ == "__main__":
    main()
