"""End-to-end throughput: our job vs transformers' pipeline vs the compute limit.

For each model, on the same N corpus images (real photos at mixed sizes, see
`benchmarks/corpus.py`), prints images/s of:

  (a) our job end to end on the local runner, manifest to Parquet (a fresh
      `label-images` process; the rate uses the job's own wall time, model
      load and Parquet write included, interpreter start-up excluded);
  (b) `transformers.pipeline("image-classification")(paths, batch_size=B)` at
      its best B, the pipeline built (model loaded) before the clock starts;
  (c) the model's forward pass alone on pre-decoded, preprocessed tensors at
      its best batch size and memory format: the compute limit;
  (c') for the CNNs, the same with the layers rewritten as our handler runs
      the model (batch norms folded into convolutions, static padding for
      TF-padded convolutions): the limit of the forward pass (a) runs;

the ratios a/b, a/c and a/c', and the peak RSS of (a). Then the optional
levers, each measured the same way: (a) with `--compile` against (c) compiled
the same way (torch.compile, freezing), and (a) with `--quantize int8` and with
`--precision bf16`, each with its top-1 agreement with fp32 (a) on the same
images. `--scale` also runs (a) at 10x the images and prints the ratio of peak
RSS.

Models: MobileNetV2 and ViT-B/16 built from transformers configs with random
weights (same compute as pretrained), and the default EfficientNet-Lite0.

Usage: python -m benchmarks.throughput [--models mobilenet_v2,vit_b16,default]
           [--images 400] [--vit-images N] [--levers compile,int8,bf16] [--scale]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from benchmarks.common import describe_machine, table  # noqa: E402
from benchmarks.corpus import build_corpus, write_manifest  # noqa: E402
from pipelines.output import SUMMARY_FILE  # noqa: E402
from transforms.model.default_model import cache_root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build_model(name: str, directory: Path) -> str:
    """A model directory for `name` ("default" is the converted EfficientNet-Lite0)."""
    if name == "default":
        from transforms.model.default_model import default_model_dir

        return str(default_model_dir())
    target = directory / name
    if (target / "config.json").exists():
        return str(target)
    import torch
    from transformers import (
        MobileNetV2Config,
        MobileNetV2ForImageClassification,
        MobileNetV2ImageProcessor,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    torch.manual_seed(0)
    labels = {i: f"class_{i}" for i in range(1000)}
    model: Any
    processor: Any
    if name == "near_free_vit":
        # benchmarks/cpu_side.py: a one-layer ViT on 7x7 patches of 32 px (~0.4 ms
        # of CPU per image) behind a real 224-px ConvNext processor.
        from transformers import ConvNextImageProcessor

        labels = {i: f"class_{i}" for i in range(10)}
        config: Any = ViTConfig(  # type: ignore[call-arg]
            image_size=224,
            patch_size=32,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            intermediate_size=8,
            num_labels=10,
            id2label=labels,
        )
        model = ViTForImageClassification(config)
        processor = ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=224 / 256)
    elif name in ("clip_b32", "near_free_clip"):
        # benchmarks/several_models.py: CLIP ViT-B/32's real shape (random
        # weights: no hub here), or one-layer towers on 32-px patches (a near-free
        # forward), behind CLIP's real 224-px processor.
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        from tests.conftest import _clip_tokenizer

        tokenizer = _clip_tokenizer()
        vocab = len(tokenizer.get_vocab())
        if name == "clip_b32":
            config = CLIPConfig(
                text_config={"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 1},
                vision_config={"patch_size": 32},
            )
        else:
            tower = {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1}
            tower["num_attention_heads"] = 1
            config = CLIPConfig(
                text_config={**tower, "vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 1},
                vision_config={**tower, "patch_size": 32},
                projection_dim=8,
            )
        model = CLIPModel(config)
        model.eval().save_pretrained(target)
        tokenizer.save_pretrained(target)
        CLIPImageProcessor().save_pretrained(target)
        return str(target)
    elif name == "mobilenet_v2":
        config = MobileNetV2Config(num_labels=1000, id2label=labels)  # type: ignore[call-arg]
        model = MobileNetV2ForImageClassification(config)
        processor = MobileNetV2ImageProcessor()
    elif name == "vit_b16":
        config = ViTConfig(num_labels=1000, id2label=labels)  # type: ignore[call-arg]
        model = ViTForImageClassification(config)
        processor = ViTImageProcessor()
    else:
        raise ValueError(f"unknown model {name!r}")
    model.eval().save_pretrained(target)
    processor.save_pretrained(target)
    return str(target)


@dataclass
class JobRun:
    images_per_s: float
    peak_rss_mb: float
    ok: int
    labels: dict[str, str]  # uri -> top-1 label


def agreement(run: JobRun, reference: JobRun) -> float:
    """Share of images whose top-1 label equals the reference run's."""
    same = sum(1 for uri, label in reference.labels.items() if run.labels.get(uri) == label)
    return same / max(len(reference.labels), 1)


# Our job exactly as the `label-images` command runs it (its `main()`, with the
# garbage collector paused through start-up: `pipelines.heap`), then its peak
# RSS. That is VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into
# a child's ru_maxrss across exec, so ru_maxrss would report this (large)
# benchmark process, not the job.
OURS_AS_THE_CLI = """
import resource
from pipelines.cli import main
try:
    main()
finally:
    try:
        with open("/proc/self/status") as status:
            peak = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("BENCH_PEAK_RSS_KB", peak, flush=True)
"""


def run_ours(model: str, manifest: Path, extra: list[str]) -> JobRun:
    """(a): the job in a fresh process, as a user runs it."""
    out = Path(tempfile.mkdtemp(prefix="bench-out-")) / "out"
    cmd = [
        sys.executable,
        "-c",
        OURS_AS_THE_CLI,
        "--input",
        str(manifest),
        "--output",
        str(out),
        "--model",
        model,
        "--progress",
        "false",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"our job failed:\n{proc.stderr[-3000:]}")
    peak_kb = next(
        int(line.split()[1])
        for line in proc.stdout.splitlines()
        if line.startswith("BENCH_PEAK_RSS_KB")
    )
    summary = json.loads((out / SUMMARY_FILE).read_text())
    import pyarrow.parquet as pq

    table = pq.ParquetDataset(sorted(str(p) for p in out.glob("part-*.parquet"))).read(
        columns=["uri", "label"]
    )
    return JobRun(
        images_per_s=summary["rows_by_status"]["ok"] / summary["wall_time_s"],
        peak_rss_mb=peak_kb / 1024.0,
        ok=summary["rows_by_status"]["ok"],
        labels=dict(
            zip(table.column("uri").to_pylist(), table.column("label").to_pylist(), strict=True)
        ),
    )


def run_seed(model: str, paths: list[Path], batch_sizes: list[int]) -> tuple[float, int]:
    """(b): transformers' pipeline on the same paths, at its best batch size."""
    from transformers import pipeline

    pipe = pipeline("image-classification", model=model, device="cpu")
    pipe([str(paths[0])])  # warm-up
    best = (0.0, 0)
    for batch_size in batch_sizes:
        start = time.perf_counter()
        pipe([str(p) for p in paths], batch_size=batch_size)
        best = max(best, (len(paths) / (time.perf_counter() - start), batch_size))
    return best


def run_forward(
    model: str,
    paths: list[Path],
    batch_sizes: list[int],
    compiled: bool = False,
    streamlined: bool = False,
) -> tuple[float, str, int]:
    """(c): forward pass alone on preprocessed tensors, best batch size and format.

    `compiled` measures the same with torch.compile as `--compile` does it
    (compile time excluded), the compute limit for (a) with `--compile`.
    `streamlined` first rewrites the layers as our handler does (batch norms
    folded, static padding): the compute limit of the forward pass (a) runs.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForImageClassification

    from transforms.images.decode import decode_image
    from transforms.model.image_classification import preferred_memory_format
    from transforms.model.loading import ModelSpec
    from transforms.model.preprocess import ImagePreprocessor
    from transforms.model.speedups.compiled import CompiledForward

    pre = ImagePreprocessor(ModelSpec(model))
    sample = [decode_image(p.read_bytes(), draft_side=pre.draft_side) for p in paths[:96]]
    pixels = np.stack(pre.pixel_values(sample))
    net = AutoModelForImageClassification.from_pretrained(model).eval()
    if streamlined:
        from transforms.model.image_classification import streamline_classifier

        streamline_classifier(net, "cpu")
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    formats = ["contiguous", "channels_last"] if has_conv else ["contiguous"]
    if compiled:  # the memory format the handler picks
        formats = ["channels_last" if preferred_memory_format(net) is not None else "contiguous"]
    best = (0.0, "", 0)
    for fmt in formats:
        memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        net = net.to(memory_format=memory_format)
        for batch_size in (b for b in batch_sizes if b <= len(pixels)):
            # Distinct images in every batch, as in a real run (a repeated batch
            # stays in cache and overstates the limit).
            batches = [
                torch.from_numpy(pixels[i : i + batch_size]).contiguous(memory_format=memory_format)
                for i in range(0, len(pixels) - batch_size + 1, batch_size)
            ]

            def logits(x: Any, net: Any = net) -> Any:
                return net(pixel_values=x).logits

            forward = CompiledForward(
                logits,
                batch_size=batch_size,
                enabled=compiled,
                background=False,
            )
            with torch.inference_mode():
                forward(batches[0])  # warm-up (and compile)
                done, start = 0, time.perf_counter()
                while done < 2 * len(pixels) or time.perf_counter() - start < 4.0:
                    forward(batches[(done // batch_size) % len(batches)])
                    done += batch_size
            rate = done / (time.perf_counter() - start)
            best = max(best, (rate, f"{fmt}, batch {batch_size}", batch_size))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="mobilenet_v2,vit_b16,default", help="'' with --scale: memory only"
    )
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument(
        "--vit-images",
        type=int,
        default=None,
        help="images for ViT-B/16 (default: --images; about 5 images/s here, so 80 is quicker)",
    )
    parser.add_argument("--seed-batch-sizes", default="1,8,16")
    parser.add_argument(
        "--scale", action="store_true", help="also run (a) at 10x the images and compare peak RSS"
    )
    parser.add_argument("--extra", default="", help="extra label-images flags for (a)")
    parser.add_argument(
        "--levers",
        default="compile,int8,bf16",
        help="optional levers to measure: compile (CNNs); int8 and bf16 (ViT and the default)",
    )
    args = parser.parse_args(argv)
    print(f"Machine: {describe_machine()}")
    bench = cache_root() / "bench"
    seed_batches = [int(b) for b in args.seed_batch_sizes.split(",")]
    extra = args.extra.split()
    for name in filter(None, args.models.split(",")):
        count = args.vit_images if name == "vit_b16" and args.vit_images else args.images
        paths = build_corpus(count)
        manifest = write_manifest(paths, bench / f"throughput-{count}.txt")
        model = build_model(name, bench / "models")
        ours = run_ours(model, manifest, extra)
        seed = run_seed(model, paths, seed_batches if name != "vit_b16" else [8])
        limit = run_forward(model, paths, [4, 8, 16, 32])
        is_cnn = name != "vit_b16"  # (c') and the compile lever are for the CNNs
        streamlined = run_forward(model, paths, [limit[2]], streamlined=True) if is_cnn else None
        rows = [
            (
                "(a) ours, end to end",
                f"{ours.images_per_s:7.2f} images/s "
                f"(peak RSS {ours.peak_rss_mb:.0f} MiB, {ours.ok} ok)",
            ),
            ("(b) transformers.pipeline", f"{seed[0]:7.2f} images/s (batch_size={seed[1]})"),
            ("(c) forward pass only", f"{limit[0]:7.2f} images/s ({limit[1]})"),
            ("a / b", f"{ours.images_per_s / seed[0]:7.2f}"),
            ("a / c", f"{ours.images_per_s / limit[0]:7.2f}"),
        ]
        if streamlined is not None:
            rows += [
                (
                    "(c') forward only, as (a) runs it",
                    f"{streamlined[0]:7.2f} images/s ({streamlined[1]}; batch norms folded, "
                    "static padding)",
                ),
                ("a / c'", f"{ours.images_per_s / streamlined[0]:7.2f}"),
            ]
        levers = set(filter(None, args.levers.split(",")))
        if "compile" in levers and is_cnn:
            fast = run_ours(model, manifest, [*extra, "--compile"])
            fast_limit = run_forward(model, paths, [limit[2]], compiled=True)
            rows += [
                (
                    "(a) ours --compile",
                    f"{fast.images_per_s:7.2f} images/s (compiled in the background)",
                ),
                ("(c) compiled forward only", f"{fast_limit[0]:7.2f} images/s ({fast_limit[1]})"),
                ("a --compile / b", f"{fast.images_per_s / seed[0]:7.2f}"),
                ("a --compile / c compiled", f"{fast.images_per_s / fast_limit[0]:7.2f}"),
            ]
        for lever, flags in (
            ("int8", ["--quantize", "int8"]),
            ("bf16", ["--precision", "bf16"]),
        ):
            if lever not in levers or name == "mobilenet_v2":
                continue
            changed = run_ours(model, manifest, [*extra, *flags])
            rows += [
                (f"(a) ours {' '.join(flags)}", f"{changed.images_per_s:7.2f} images/s"),
                (f"a {lever} / b", f"{changed.images_per_s / seed[0]:7.2f}"),
                (f"a {lever} / c (fp32)", f"{changed.images_per_s / limit[0]:7.2f}"),
                (f"top-1 agreement {lever} vs fp32", f"{100 * agreement(changed, ours):6.1f} %"),
            ]
        print(f"\n{name}, {count} corpus images:")
        print(table(rows))
    if args.scale:
        paths = build_corpus(args.images * 10)
        small = run_ours(
            build_model("mobilenet_v2", bench / "models"),
            write_manifest(paths[: args.images], bench / "scale-small.txt"),
            extra,
        )
        large = run_ours(
            build_model("mobilenet_v2", bench / "models"),
            write_manifest(paths, bench / "scale-large.txt"),
            extra,
        )
        print(f"\nMemory, mobilenet_v2, (a) at {args.images} and {len(paths)} images:")
        print(
            table(
                [
                    (f"peak RSS at {args.images}", f"{small.peak_rss_mb:7.0f} MiB"),
                    (f"peak RSS at {len(paths)}", f"{large.peak_rss_mb:7.0f} MiB"),
                    ("ratio", f"{large.peak_rss_mb / small.peak_rss_mb:7.3f}   target <= 1.15"),
                    (
                        "images/s at each size",
                        f"{small.images_per_s:.1f} / {large.images_per_s:.1f}",
                    ),
                ]
            )
        )


if __name__ == "__main__":
    main()
