"""Fetch throughput against a loopback server with 50 ms of latency per response.

Prints, in one run, images/s of:
  (a) our fetch stage, fetching only: `FetchDecodePreprocess`'s thread pool and
      `Fetcher` with the default settings, decode left out;
  (b) a one-at-a-time loop: urllib fetch, nothing else;
  (c) our whole stage: fetch + decode + preprocess for the default model;
  (d) a one-at-a-time loop of fetch + the same decode + preprocess;
and the ratios a/b (target >= 15) and c/d.

Usage: python -m benchmarks.fetch [--images 400] [--latency-ms 50]
"""

from __future__ import annotations

import argparse
import os
import time
import urllib.request
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import describe_machine, table  # noqa: E402
from benchmarks.corpus import build_corpus  # noqa: E402
from tests.http_server import serve_in_subprocess  # noqa: E402
from transforms.fetch_decode import FetchDecodePreprocess  # noqa: E402
from transforms.images.decode import decode_image  # noqa: E402
from transforms.images.fetch import FetchOptions  # noqa: E402
from transforms.model.loading import ModelSpec  # noqa: E402
from transforms.model.preprocess import ImagePreprocessor  # noqa: E402
from transforms.rows import ImageRow  # noqa: E402
from transforms.spec import LabelingSpec  # noqa: E402


class FetchOnly(FetchDecodePreprocess):
    """Our stage with decode and preprocess left out: the fetch machinery alone."""

    def load(self, row: ImageRow, data: bytes | None = None) -> np.ndarray:
        if data is None:
            data = self._fetcher.fetch(row.uri)
        return np.frombuffer(data, dtype=np.uint8)


def run_stage(urls: list[str], fetch: FetchOptions, decode: bool) -> tuple[float, int]:
    """Drive our DoFn the way a runner does (setup, process..., finish_bundle)."""
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import MIN_TIMESTAMP

    cls = FetchDecodePreprocess if decode else FetchOnly
    dofn = cls(ImagePreprocessor(ModelSpec()), fetch, LabelingSpec().decode)
    dofn.setup()
    ok = 0
    start = time.perf_counter()

    def count(outputs: Any) -> int:
        return sum(1 for o in outputs if not hasattr(o, "tag"))

    for i, url in enumerate(urls):
        row = ImageRow(index=f"0:{i}", uri=url)
        ok += count(dofn.process(row, MIN_TIMESTAMP, GlobalWindow()))
    ok += count(dofn.finish_bundle())
    elapsed = time.perf_counter() - start
    dofn.teardown()
    return len(urls) / elapsed, ok


def sequential(urls: list[str], decode: bool) -> float:
    preprocessor = ImagePreprocessor(ModelSpec())
    preprocessor.setup()
    draft = preprocessor.draft_side
    start = time.perf_counter()
    for url in urls:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
        if decode:
            preprocessor([decode_image(data, draft_side=draft)])
    return len(urls) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument(
        "--sequential-images",
        type=int,
        default=100,
        help="images for the one-at-a-time loops (they are slow)",
    )
    args = parser.parse_args(argv)
    print(f"Machine: {describe_machine()}")
    # The small images of the corpus (500x375 JPEG), as a web crawl mostly sees.
    paths = [p for p in build_corpus(args.images * 2) if p.stat().st_size < 200_000]
    paths = paths[: args.images]
    images = {p.name: p.read_bytes() for p in paths}
    # The server runs in its own process, as a real one would.
    with serve_in_subprocess(images, latency_s=args.latency_ms / 1000.0) as base_url:
        urls = [f"{base_url}/img/{p.name}" for p in paths]
        defaults = LabelingSpec().fetch
        fetch_only, ok = run_stage(urls, defaults, decode=False)
        assert ok == len(urls), f"only {ok} of {len(urls)} fetched"
        full, ok = run_stage(urls, defaults, decode=True)
        assert ok == len(urls), f"only {ok} of {len(urls)} decoded"
        seq_fetch = sequential(urls[: args.sequential_images], decode=False)
        seq_full = sequential(urls[: args.sequential_images], decode=True)
    settings = f"concurrency {defaults.concurrency}, per host {defaults.per_host}"
    rows = [
        (f"(a) our fetch stage, fetch only ({settings})", f"{fetch_only:8.1f} images/s"),
        ("(b) one-at-a-time fetch loop", f"{seq_fetch:8.1f} images/s"),
        ("(c) our fetch stage, fetch + decode + preprocess", f"{full:8.1f} images/s"),
        ("(d) one-at-a-time fetch + decode + preprocess", f"{seq_full:8.1f} images/s"),
        ("a / b", f"{fetch_only / seq_fetch:8.1f}x   target >= 15"),
        ("c / d", f"{full / seq_full:8.1f}x"),
    ]
    print(
        f"\nFetch, loopback server with {args.latency_ms:.0f} ms latency per response, "
        f"{len(urls)} JPEGs (500x375):"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
