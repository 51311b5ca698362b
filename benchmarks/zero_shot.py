"""Zero-shot throughput: our label-bank pipeline vs transformers' pipeline.

On a CLIP ViT-B/32-sized model with random weights (same compute as the
pretrained one) and ImageNet class names as labels, prints images/s for our
job at 10 and 1,000 labels and for `transformers.pipeline` at 10 and 1,000
labels, all on the same images, and the ratios the issue targets:

    ours@1000 / transformers@1000  (target >= 20)
    ours@1000 / ours@10            (target >= 0.9)

Usage: python -m benchmarks.zero_shot [--images 96] [--seed-images 24]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from benchmarks.common import describe_machine, fresh_output, run_job, table  # noqa: E402
from benchmarks.corpus import build_corpus, write_manifest  # noqa: E402
from pipelines.config import JobConfig  # noqa: E402
from transforms.model.default_model import cache_root  # noqa: E402
from transforms.spec import LabelingSpec  # noqa: E402


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet class names (first synonym), unique."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    seen: dict[str, int] = {}
    labels = []
    for i in range(info.num_classes()):
        name = info.index_to_description(i).split(",")[0].strip()
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} {seen[name]}")
    return labels


def clip_b32(directory: Path, labels: list[str]) -> Path:
    """A randomly initialised CLIP ViT-B/32 with a word-level tokenizer over the labels."""
    if (directory / "model.safetensors").exists():
        return directory
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    words = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    for text in labels + ["This is a photo of ."]:
        for word in text.lower().replace(".", " . ").split():
            words.setdefault(word, len(words))
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=77,
    )
    torch.manual_seed(0)
    # CLIPConfig's defaults are the ViT-B/32 sizes; only the token ids change.
    config = CLIPConfig(text_config={"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1})
    directory.mkdir(parents=True, exist_ok=True)
    CLIPModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor().save_pretrained(directory)
    return directory


def seed_images_per_s(model_dir: Path, paths: list[Path], labels: list[str]) -> tuple[float, int]:
    """transformers' pipeline at its best batch size among a few."""
    from transformers import pipeline

    pipe = pipeline("zero-shot-image-classification", model=str(model_dir), device="cpu")
    pipe([str(paths[0])], candidate_labels=labels[:2])  # warm-up
    best = (0.0, 0)
    for batch_size in (1, 8):
        start = time.perf_counter()
        pipe([str(p) for p in paths], candidate_labels=labels, batch_size=batch_size)
        rate = len(paths) / (time.perf_counter() - start)
        best = max(best, (rate, batch_size))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="images for our job")
    parser.add_argument(
        "--seed-images",
        type=int,
        default=24,
        help="images for transformers' pipeline (a prefix of ours; it is ~40x slower)",
    )
    args = parser.parse_args(argv)
    print(f"Machine: {describe_machine()}")
    labels = imagenet_labels()
    bench = cache_root() / "bench"
    model_dir = clip_b32(bench / "clip-vit-b32-random", labels)
    paths = build_corpus(args.images)
    manifest = write_manifest(paths, bench / f"zero-shot-{args.images}.txt")
    results = {}
    for count in (10, 1000):
        label_file = bench / f"labels-{count}.txt"
        label_file.write_text("\n".join(labels[:count]) + "\n")
        config = JobConfig(
            input=str(manifest),
            output=fresh_output(),
            labeling=LabelingSpec(
                task="zero-shot-image-classification",
                model=str(model_dir),
                candidate_labels_file=str(label_file),
            ),
            progress=False,
        )
        results[f"ours@{count}"] = run_job(config)
    seed = {}
    for count in (10, 1000):
        seed[count] = seed_images_per_s(model_dir, paths[: args.seed_images], labels[:count])
    ours10, ours1000 = results["ours@10"], results["ours@1000"]
    rows = [
        (
            "ours, 10 labels (end to end)",
            f"{ours10.images_per_s:7.2f} images/s (model load + label bank {ours10.load_s:.1f}s)",
        ),
        (
            "ours, 1000 labels (end to end)",
            f"{ours1000.images_per_s:7.2f} images/s "
            f"(model load + label bank {ours1000.load_s:.1f}s)",
        ),
        ("ours, 10 labels (load excluded)", f"{ours10.steady_images_per_s:7.2f} images/s"),
        ("ours, 1000 labels (load excluded)", f"{ours1000.steady_images_per_s:7.2f} images/s"),
        ("transformers, 10 labels", f"{seed[10][0]:7.2f} images/s (batch_size={seed[10][1]})"),
        (
            "transformers, 1000 labels",
            f"{seed[1000][0]:7.2f} images/s (batch_size={seed[1000][1]})",
        ),
        (
            "ours@1000 / transformers@1000 (end to end)",
            f"{ours1000.images_per_s / seed[1000][0]:7.1f}x   target >= 20",
        ),
        (
            "ours@1000 / ours@10 (end to end)",
            f"{ours1000.images_per_s / ours10.images_per_s:7.2f}    target >= 0.9",
        ),
        (
            "ours@1000 / ours@10 (load excluded)",
            f"{ours1000.steady_images_per_s / ours10.steady_images_per_s:7.2f}",
        ),
    ]
    print(
        f"\nZero-shot, CLIP ViT-B/32 (random weights), {args.images} corpus images "
        f"({args.seed_images} for transformers):"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
