"""Cached corpora of real photos, made from photos in scikit-image.

- "mixed": half the images 500x375, 30% 1024x768 and 20% 3000x2000, JPEG
  quality 75-95; its large images make decoding the cost.
- "imagenet": ImageNet-like photos, as LAION, CC12M and ImageNet mostly hold:
  500x375, 375x500 and 500x333 in turn, JPEG quality 85-95.

Each image is a different crop / flip / resize of one of the source photos, so
decoding costs what it costs on real datasets.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from PIL import Image, ImageOps

from transforms.model.default_model import cache_root

SOURCES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
)
SIZES = ((500, 375, 0.5), (1024, 768, 0.3), (3000, 2000, 0.2))
IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333))
VERSION = "1"
CORPORA = ("mixed", "imagenet")


def _source_images() -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in SOURCES]


# 5 small, 3 medium, 2 large in every run of ten, so any prefix has the mix.
_PATTERN = (0, 1, 0, 2, 0, 1, 0, 1, 2, 0)


def _size_for(i: int) -> tuple[int, int]:
    width, height, _ = SIZES[_PATTERN[i % len(_PATTERN)]]
    return width, height


def build_corpus(
    n: int, directory: Path | None = None, seed: int = 0, kind: str = "mixed"
) -> list[Path]:
    """Return paths of `n` JPEGs of corpus `kind`, creating (and caching) those missing."""
    if kind not in CORPORA:
        raise ValueError(f"unknown corpus {kind!r}; expected one of {CORPORA}")
    suffix = "" if kind == "mixed" else f"-{kind}"
    directory = directory or cache_root() / f"bench-corpus-v{VERSION}{suffix}"
    directory.mkdir(parents=True, exist_ok=True)
    sources: list[Image.Image] | None = None
    paths = []
    for i in range(n):
        path = directory / f"img_{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        if sources is None:
            sources = _source_images()
        rng = random.Random(hashlib.sha256(f"{seed}:{i}".encode()).digest())
        src = sources[i % len(sources)]
        width, height = _size_for(i) if kind == "mixed" else IMAGENET_SIZES[i % 3]
        # A random crop of 60-100% of the source with the target aspect ratio.
        scale = rng.uniform(0.6, 1.0)
        crop_w = min(src.width, int(src.height * width / height)) * scale
        crop_h = crop_w * height / width
        x = rng.uniform(0, src.width - crop_w)
        y = rng.uniform(0, src.height - crop_h)
        image = src.crop((int(x), int(y), int(x + crop_w), int(y + crop_h)))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        image.save(path, quality=rng.randint(75, 95) if kind == "mixed" else rng.randint(85, 95))
    return paths


def write_manifest(paths: list[Path], manifest: Path) -> Path:
    manifest.write_text("\n".join(str(p) for p in paths) + "\n")
    return manifest
