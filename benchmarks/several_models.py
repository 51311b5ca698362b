"""One pass of several models against one run per model, back to back.

Each job is a whole process (`python -m pipelines.label_images`, start-up and
model loads included) on the same images. The one-pass job fetches and
decodes each image once and shares CLIP's preprocessing between the two CLIP
entries; the single-model runs each do all of it again. Printed per corpus
(ImageNet-like and mixed) and per forward:

- real: the default classifier (EfficientNet-Lite0) and CLIP ViT-B/32 (its
  real shape with random weights: there is no model hub here), on this CPU;
- near-free: a one-layer classifier and one-layer CLIP towers behind the same
  real processors, as a GPU worker sees it (the forward leaves the CPU).

Two models: the classifier and CLIP zero-shot tags. Three: plus a second CLIP
entry with its own labels and embeddings (equal processors: one preprocessing).
Ratio = (sum of the single runs' wall times) / (the one pass's wall time). The
sharing limit is what sharing can save per image at most, from the decode and
processor costs measured on one core in the same run: (decode + each model's
processor, per run) over (one decode + each distinct processor once). Start-up
saved comes on top of it; the forward passes, which nothing shares, below.

    python -m benchmarks.several_models --images 300 [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import yaml  # noqa: E402

from benchmarks.common import describe_machine, run_cli_job  # noqa: E402
from benchmarks.corpus import build_corpus, write_manifest  # noqa: E402
from benchmarks.throughput import build_model  # noqa: E402
from pipelines.output import SUMMARY_FILE  # noqa: E402

TAGS = ["a cat", "a dog", "a car", "a bird", "food", "a building", "a person", "a tree"]
EMBED_TAGS = ["indoors", "outdoors", "day", "night"]
#: The issue's goals for two models (one pass / two runs).
GOAL_REAL, GOAL_NEAR_FREE = 1.3, 1.8


def _entries(forward: str, models_dir: Path, count: int) -> list[dict[str, Any]]:
    classifier = build_model("default" if forward == "real" else "near_free_vit", models_dir)
    clip = build_model("clip_b32" if forward == "real" else "near_free_clip", models_dir)
    entries: list[dict[str, Any]] = [
        {"name": "cls", "model": classifier},
        {"name": "tags", "model": clip, "candidate_labels": TAGS},
        {"name": "emb", "model": clip, "candidate_labels": EMBED_TAGS, "embeddings": True},
    ]
    return entries[:count]


def _run(config: dict[str, Any], folder: Path, name: str) -> tuple[float, int]:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "device": "cpu", "report": False}))
    wall, out = run_cli_job(["--config", str(path)], prefix="bench-several-")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    return wall, int(summary["rows_by_status"]["ok"])


def stage_costs(paths: list[Path], models: list[str], sample: int = 100) -> dict[str, float]:
    """ms per image on one core, no Beam: the decode, and each model's processor."""
    import time

    from transforms.images.decode import decode_image
    from transforms.model.loading import ModelSpec
    from transforms.model.preprocess import ImagePreprocessor

    chosen = paths[:sample]
    started = time.perf_counter()
    decoded = [decode_image(p.read_bytes()) for p in chosen]
    costs = {"decode": 1000 * (time.perf_counter() - started) / len(chosen)}
    for model in dict.fromkeys(models):
        pre = ImagePreprocessor(ModelSpec(model))
        pre.setup()
        started = time.perf_counter()
        for image in decoded:
            pre([image])
        costs[model] = 1000 * (time.perf_counter() - started) / len(chosen)
    return costs


def sharing_limit(costs: dict[str, float], models: list[str]) -> float:
    """What sharing the decode (and equal processors) can save at most, per
    image: the single runs' decode and preprocessing over the one pass's."""
    separate = sum(costs["decode"] + costs[m] for m in models)
    one_pass = costs["decode"] + sum(costs[m] for m in dict.fromkeys(models))
    return separate / one_pass


def bench(corpus: str, forward: str, images: int, models_dir: Path) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="bench-several-cfg-"))
    paths = build_corpus(images, kind=corpus)
    manifest = write_manifest(paths, folder / "manifest.txt")
    entries = _entries(forward, models_dir, 3)
    costs = stage_costs(paths, [e["model"] for e in entries])
    singles = {}
    for entry in entries:
        options = {k: v for k, v in entry.items() if k != "name"}
        singles[entry["name"]] = _run(
            {"input": str(manifest), **options}, folder, f"single-{entry['name']}"
        )
    result: dict[str, Any] = {
        "corpus": corpus,
        "forward": forward,
        "singles": singles,
        "costs_ms": costs,
    }
    for count in (2, 3):
        wall, ok = _run(
            {"input": str(manifest), "models": entries[:count]}, folder, f"pass-{count}"
        )
        assert ok == images, f"the one pass labeled {ok} of {images}"
        separate = sum(singles[e["name"]][0] for e in entries[:count])
        limit = sharing_limit(costs, [e["model"] for e in entries[:count]])
        result[f"pass{count}"] = {
            "wall": wall,
            "separate": separate,
            "ratio": separate / wall,
            "limit": limit,
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--corpus", choices=["imagenet", "mixed", "both"], default="both")
    parser.add_argument("--forward", choices=["real", "near-free", "both"], default="both")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat each cell; the median round is shown"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    models_dir = Path(tempfile.gettempdir()) / "bench-several-models"
    models_dir.mkdir(exist_ok=True)
    corpora = ["imagenet", "mixed"] if args.corpus == "both" else [args.corpus]
    forwards = ["real", "near-free"] if args.forward == "both" else [args.forward]
    print(describe_machine())
    print(f"{args.images} images per corpus; whole processes; ratio = separate runs / one pass\n")
    print(
        "| corpus | forward | single cls / tags / emb (s) | 2 models: separate / one pass (s) "
        "| ratio (goal) | sharing limit | 3 models: separate / one pass (s) | ratio "
        "| sharing limit | decode, cls, CLIP processor (ms/image, one core) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for corpus in corpora:
        for forward in forwards:
            rounds = [bench(corpus, forward, args.images, models_dir) for _ in range(args.rounds)]
            # The round of the median two-model ratio (one run's figures, not a mix).
            r = sorted(rounds, key=lambda x: x["pass2"]["ratio"])[len(rounds) // 2]
            r["rounds"] = [
                {"pass2": x["pass2"]["ratio"], "pass3": x["pass3"]["ratio"]} for x in rounds
            ]
            results.append(r)
            singles = " / ".join(f"{r['singles'][n][0]:.1f}" for n in ("cls", "tags", "emb"))
            goal = GOAL_REAL if forward == "real" else GOAL_NEAR_FREE
            two, three = r["pass2"], r["pass3"]
            costs = " / ".join(f"{v:.1f}" for v in r["costs_ms"].values())
            print(
                f"| {corpus} | {forward} | {singles} | {two['separate']:.1f} / {two['wall']:.1f} "
                f"| **{two['ratio']:.2f}** (≥ {goal}) | {two['limit']:.2f} "
                f"| {three['separate']:.1f} / {three['wall']:.1f} | **{three['ratio']:.2f}** "
                f"| {three['limit']:.2f} | {costs} |",
                flush=True,
            )
            if args.rounds > 1:
                each = ", ".join(f"{x['pass2']:.2f}/{x['pass3']:.2f}" for x in r["rounds"])
                print(f"|  | rounds (2/3 models) | {each} | | | | | | | |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
