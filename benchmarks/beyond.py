"""What `--embeddings` and WebDataset shards cost, measured side by side.

Runs the default job (the default model, exact decoding) on the mixed-size
real-photo corpus (`benchmarks/corpus.py`) in fresh processes, start-up
included, interleaved over `--rounds` rounds, four ways:

- from a manifest of image files;
- the same manifest with `--embeddings`;
- the same images packed into WebDataset tar shards (`--shard-size` samples each);
- those shards with `--embeddings`.

It prints images/s and ratios, and the Parquet bytes per row with and without
the embedding column.

    python -m benchmarks.beyond [--images 400] [--rounds 2] [--shard-size 100]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import describe_machine, run_cli_job, table  # noqa: E402
from benchmarks.corpus import build_corpus, write_manifest  # noqa: E402
from transforms.model.default_model import cache_root  # noqa: E402


def write_shards(paths: list[Path], directory: Path, shard_size: int) -> str:
    """Pack the images into shards as webdataset's ShardWriter does; the brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    count = (len(paths) + shard_size - 1) // shard_size
    for shard in range(count):
        target = directory / f"{shard:06d}.tar"
        if target.exists():
            continue
        with tarfile.open(target.with_suffix(".partial"), "w") as tar:
            for i, path in enumerate(paths[shard * shard_size : (shard + 1) * shard_size]):
                data = path.read_bytes()
                info = tarfile.TarInfo(f"{shard:06d}{i:05d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        target.with_suffix(".partial").rename(target)
    return str(directory / f"{{000000..{count - 1:06d}}}.tar")


def run_job(source: str, embeddings: bool) -> tuple[float, int, int]:
    """One job in a fresh process: (images/s from process start, ok rows, output bytes)."""
    import pyarrow.parquet as pq

    args = ["--input", source, "--report", "false"] + (["--embeddings"] if embeddings else [])
    wall, out = run_cli_job(args, prefix="bench-beyond-")
    files = sorted(out.glob("part-*.parquet"))
    statuses = pq.ParquetDataset([str(f) for f in files]).read(columns=["status"])
    ok = statuses.column("status").to_pylist().count("ok")
    return ok / wall, ok, sum(f.stat().st_size for f in files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=100)
    args = parser.parse_args(argv)
    print(f"Machine: {describe_machine()}")
    paths = build_corpus(args.images)
    manifest = str(write_manifest(paths, cache_root() / f"bench-beyond-{args.images}.txt"))
    shards = write_shards(
        paths, cache_root() / f"bench-shards-{args.images}-{args.shard_size}", args.shard_size
    )
    modes = {
        "manifest": (manifest, False),
        "manifest --embeddings": (manifest, True),
        "tar shards": (shards, False),
        "tar shards --embeddings": (shards, True),
    }
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    sizes: dict[str, tuple[int, int]] = {}
    for _ in range(args.rounds):
        for mode, (source, embeddings) in modes.items():
            speed, ok, size = run_job(source, embeddings)
            speeds[mode].append(round(speed, 2))
            sizes[mode] = (ok, size)
    median = {m: statistics.median(v) for m, v in speeds.items()}
    rows: list[tuple[str, str]] = [
        ("images", f"{args.images} (mixed sizes), {args.rounds} rounds, interleaved"),
    ]
    rows += [(f"{m}, images/s", f"{median[m]:.1f}  (runs: {speeds[m]})") for m in modes]
    rows += [
        (
            "--embeddings / without (manifest)",
            f"{median['manifest --embeddings'] / median['manifest']:.2f}x",
        ),
        (
            "--embeddings / without (shards)",
            f"{median['tar shards --embeddings'] / median['tar shards']:.2f}x",
        ),
        ("tar shards / manifest", f"{median['tar shards'] / median['manifest']:.2f}x"),
    ]
    for mode in ("manifest", "manifest --embeddings"):
        ok, size = sizes[mode]
        rows.append((f"Parquet bytes per row, {mode}", f"{size / max(ok, 1):.0f}"))
    print(table(rows))


if __name__ == "__main__":
    main()
