"""Label a few real photos with the offline default model: the README's first command.

The photos ship inside scikit-image (`skimage.data`); they are written as JPEGs
next to a plain-text manifest, labeled by `label-images` with no `--model`, and
the top labels are printed.

Usage: python -m pipelines.demo [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow.parquet as pq

from pipelines import label_images
from pipelines.clock import process_started_at

# skimage.data photos: real camera images, not generated noise.
SAMPLE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "hubble_deep_field")


def write_samples(directory: Path) -> Path:
    """Write the sample photos and a manifest listing them; return the manifest."""
    from PIL import Image
    from skimage import data

    directory.mkdir(parents=True, exist_ok=True)
    lines = ["# Real photos from scikit-image, labeled by `python -m pipelines.demo`"]
    for name in SAMPLE_PHOTOS:
        Image.fromarray(getattr(data, name)()).convert("RGB").save(
            directory / f"{name}.jpg", quality=92
        )
        lines.append(f"{name}.jpg")
    manifest = directory / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo", help="where samples and output go")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    manifest = write_samples(workdir / "samples")
    output = workdir / "output"
    code = label_images.run(
        ["--input", str(manifest), "--output", str(output), "--overwrite", "--top-k", "3"],
        started_at=process_started_at(),
    )
    if code != 0:
        return code
    table = pq.read_table(output)  # the output folder reads as one table
    print(f"\nParquet written to {output}/ ({table.num_rows} rows):")
    for row in sorted(table.to_pylist(), key=lambda r: r["uri"]):
        pairs = zip(row["labels"], row["scores"], strict=True)
        top = ", ".join(f"{label} {score:.2f}" for label, score in pairs)
        print(f"  {row['uri']:<24} {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
