"""`FetchDecodePreprocess`: rows in, the models' pixels out, one decode per image.

Each row is fetched (network waits overlap on an event loop or an I/O pool),
decoded once on a few decode threads, and run through each distinct
preprocessor of the pass. A row that fails to fetch or decode comes out as
`(row, RowError)` in the same output; a preprocessor that fails on an image
fails only the models that use it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar

import apache_beam as beam
import numpy as np
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image, ImageOps

from transforms.allocator import tune_malloc
from transforms.errors import ErrorCode, RowError
from transforms.images.decode import DecodeOptions, decode_image
from transforms.images.fetch import Fetcher, FetchOptions
from transforms.model.preprocess import Preprocessor
from transforms.rows import ImageRow
from transforms.uri import scheme_of

logger = logging.getLogger(__name__)

#: What a several-preprocessor `FetchDecodePreprocess` emits per row that
#: decoded: one result per preprocessor, in their order.
Pixels = tuple["np.ndarray | RowError", ...]


def load_image(
    row: ImageRow,
    *,
    fetcher: Fetcher,
    decode: DecodeOptions,
    draft_side: int | None,
    data: bytes | None = None,
) -> Image.Image:
    """One row's decoded RGB image: from `data`, its inline image, or the bytes
    at its URI.

    Raises:
        RowError: for any failure of this row.
    """
    if row.error is not None:
        raise row.error
    if data is None and isinstance(row.image, Image.Image):
        # As transformers' load_image does for PIL inputs.
        return (ImageOps.exif_transpose(row.image) or row.image).convert("RGB")
    if data is None:
        data = row.image if row.image is not None else fetcher.fetch(row.uri)
    return decode_image(data, draft_side=draft_side, max_pixels=decode.max_pixels)


def preprocess(preprocessor: Preprocessor, image: Image.Image) -> np.ndarray:
    """One image through one preprocessor.

    Raises:
        RowError: `decode_failed` when the preprocessor fails on the image.
    """
    try:
        (pixel_values,) = preprocessor([image])
    except Exception as e:
        raise RowError(
            ErrorCode.DECODE_FAILED, f"preprocessing failed: {type(e).__name__}: {e}"
        ) from e
    return pixel_values


def _tried(preprocessor: Preprocessor, image: Image.Image) -> np.ndarray | RowError:
    try:
        return preprocess(preprocessor, image)
    except RowError as e:
        return e
    except Exception as e:  # a bug fails this preprocessor's models only
        return RowError(ErrorCode.DECODE_FAILED, f"{type(e).__name__}: {e}")


class _DecodePools:
    """One decode pool per process and size, shared by the DoFn instances in it.

    An in-process runner (and a Dataflow worker) runs several bundle threads,
    each with its own `FetchDecodePreprocess`; a pool each put `threads` decode
    threads per bundle thread on the cores, contending for them and for the
    GIL. Shared, `--decode-threads` means what it says: images decoded at once
    per worker process. The last instance to tear down shuts the pool down.
    """

    _lock = threading.Lock()
    _pools: ClassVar[dict[tuple[int, int], tuple[ThreadPoolExecutor, int]]] = {}

    @classmethod
    def acquire(cls, threads: int) -> ThreadPoolExecutor:
        key = (os.getpid(), threads)  # a forked child starts its own
        with cls._lock:
            pool, users = cls._pools.get(key) or (None, 0)
            if pool is None:
                pool = ThreadPoolExecutor(
                    max_workers=threads,
                    thread_name_prefix="decode",
                    initializer=single_threaded_torch_in_this_thread,
                )
            cls._pools[key] = (pool, users + 1)
            return pool

    @classmethod
    def release(cls, pool: ThreadPoolExecutor) -> None:
        with cls._lock:
            key = next((k for k, (p, _) in cls._pools.items() if p is pool), None)
            if key is None:
                return
            _, users = cls._pools[key]
            if users > 1:
                cls._pools[key] = (pool, users - 1)
                return
            del cls._pools[key]
        pool.shutdown(wait=True, cancel_futures=True)


def single_threaded_torch_in_this_thread() -> None:
    """Make torch ops in the calling thread run on one OpenMP thread.

    Image processors run torch ops (resize, normalize) on the decode threads.
    Each thread that runs an OpenMP region gets its own team of
    `torch.get_num_threads()` threads, so two decode threads beside the
    forward pass put three teams on the cores, spinning at each other's
    barriers. `torch.set_num_threads` is process-wide (it would slow the
    forward pass too), but OpenMP's team size is a per-thread setting: we let
    torch initialise this thread, then set this thread's team size to 1.
    """
    try:
        import ctypes

        import torch

        torch.ones(64).sum()  # torch's lazy per-thread init, which sets the team size
        with open("/proc/self/maps") as maps:
            library = next((line.split()[-1] for line in maps if "libgomp" in line), None)
        if library:
            ctypes.CDLL(library).omp_set_num_threads(1)
    except Exception:  # best effort: other platforms and OpenMP runtimes differ
        logger.debug("could not limit OpenMP threads on a decode thread", exc_info=True)


#: A bundle thread over its rows-in-flight cap waits for this many rows to finish
#: (fewer when fewer are in flight, or a quarter of a small cap) before it
#: emits again. 3,000 ImageNet-sized photos, near-free model, 2 cores: steady
#: 0.66 -> 0.69 of the stage limit (medians of 8 interleaved rounds, 7 of them
#: faster).
WAKE_AFTER_ROWS = 16
_NOBODY_WAITS = sys.maxsize


class FetchDecodePreprocess(beam.DoFn):
    """Turns an `ImageRow` into `(row, pixel_values)`, or `(row, RowError)` for a
    row that failed (in the same output). Never raises for a bad image.

    Given a sequence of preprocessors, it decodes each image once and emits
    `(row, Pixels)`: one result per preprocessor, a `RowError` where that one
    failed on the image.

    Up to `fetch.concurrency` rows are in flight, so network latency overlaps:
    http(s) downloads wait on the fetcher's event loop, gs:// and s3:// on an
    I/O thread pool, and `decode.decode_threads` threads per process (shared by the
    instances of every bundle thread) decode and preprocess (Pillow releases
    the GIL while it decodes). Results are emitted as they complete, in any
    order.

    Example::

        spec = LabelingSpec(model="default")
        pre = ImagePreprocessor(spec.model_spec)
        keyed = rows | beam.ParDo(FetchDecodePreprocess(pre, spec.fetch, spec.decode))
    """

    def __init__(
        self,
        preprocessor: Preprocessor | Sequence[Preprocessor],
        fetch: FetchOptions,
        decode: DecodeOptions,
    ) -> None:
        self._several = isinstance(preprocessor, Sequence)
        self._preprocessors: tuple[Preprocessor, ...] = (
            tuple(preprocessor) if isinstance(preprocessor, Sequence) else (preprocessor,)
        )
        self._fetch = fetch
        self._decode = decode

    def setup(self) -> None:
        if self._decode.tune_malloc:
            tune_malloc()
        for preprocessor in self._preprocessors:
            preprocessor.setup()
        # Fast decoding keeps enough pixels for the largest model input.
        self._draft_side = (
            max(p.draft_side for p in self._preprocessors) if self._decode.fast else None
        )
        self._fetcher = Fetcher(self._fetch)
        # Decoding runs on a few threads only; network fetches wait elsewhere
        # (http(s) on the fetcher's event loop, gs:// and s3:// on an I/O pool),
        # so dozens of downloads in flight never mean dozens of threads
        # allocating decode buffers (each thread grows its own malloc arena).
        self._decode_pool = _DecodePools.acquire(self._decode.decode_threads)
        self._io_pool: ThreadPoolExecutor | None = None
        # Rows submitted and not yet emitted; finished ones wait in `_finished`
        # (their futures' callbacks put them there), so emitting one costs O(1)
        # instead of a scan of every row in flight. A bundle thread that must
        # wait is woken by `_ready` once `_wanted` rows have finished.
        self._in_flight = 0
        self._finished: deque[tuple[Future[Any], WindowedValue]] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._wanted = _NOBODY_WAITS

    def teardown(self) -> None:
        _DecodePools.release(self._decode_pool)
        if self._io_pool is not None:
            self._io_pool.shutdown(wait=True, cancel_futures=True)
        self._fetcher.close()

    def load(self, row: ImageRow, data: bytes | None = None) -> np.ndarray | Pixels:
        """Decode and preprocess one row, fetching it first unless `data` (or the
        row's own image) is given. Runs on a decode thread.

        Raises:
            RowError: for any failure of this row.
        """
        image = load_image(
            row, fetcher=self._fetcher, decode=self._decode, draft_side=self._draft_side, data=data
        )
        del data
        if not self._several:
            return preprocess(self._preprocessors[0], image)
        return tuple(_tried(p, image) for p in self._preprocessors)

    def _submit(self, row: ImageRow) -> Future[Any]:
        """Start one row: remote bytes are fetched off the decode threads first."""
        scheme = scheme_of(row.uri) if row.uri else "file"
        # Rows with nothing to download (inline images, local files, rows that
        # will be invalid_input) go straight to a decode thread.
        if (
            row.error is not None
            or row.image is not None
            or scheme == "file"
            or scheme not in self._fetch.allowed_schemes
        ):
            return self._decode_pool.submit(self.load, row)
        if scheme in ("http", "https"):
            fetched = self._fetcher.fetch_async(row.uri or "")
        else:
            if self._io_pool is None:
                self._io_pool = ThreadPoolExecutor(
                    max_workers=self._fetch.concurrency, thread_name_prefix="fetch"
                )
            fetched = self._io_pool.submit(self._fetcher.fetch, row.uri)
        result: Future[Any] = Future()

        def decoded(future: Future[Any]) -> None:
            try:
                result.set_result(future.result())
            except BaseException as e:
                result.set_exception(e)

        def on_fetched(future: Future[bytes]) -> None:
            try:
                data = future.result()
            except BaseException as e:
                result.set_exception(e)
                return
            self._decode_pool.submit(self.load, row, data).add_done_callback(decoded)

        fetched.add_done_callback(on_fetched)
        return result

    def _result(self, future: Future[Any], element: WindowedValue) -> Any:
        row = element.value
        try:
            return element.with_value((row, future.result()))
        except RowError as e:
            failure = e
        except Exception as e:  # a bug must still give a row, not kill the bundle
            failure = RowError(ErrorCode.DECODE_FAILED, f"{type(e).__name__}: {e}")
        # Counted once, in `_to_record`, where every row's final result arrives.
        return element.with_value((row, failure))

    def _on_done(self, future: Future[Any], element: WindowedValue) -> None:
        """A row finished (on whichever thread finished it): queue it, and wake
        the bundle thread if it waits for this many."""
        with self._ready:
            self._finished.append((future, element))
            if len(self._finished) >= self._wanted:
                self._ready.notify()

    def _wait_for(self, rows: int) -> None:
        """Block until `rows` finished rows wait to be emitted."""
        with self._ready:
            self._wanted = rows
            self._ready.wait_for(lambda: len(self._finished) >= rows)
            self._wanted = _NOBODY_WAITS

    def _emit(self, cap: int) -> Iterator[Any]:
        """Emit every finished row; then, while more than `cap` are in flight,
        wait for the next few to finish.

        The wait is for up to `WAKE_AFTER_ROWS` rows, not one: a bundle thread
        woken for each finished row takes the GIL from the decode threads as
        often, and on small images those hand-offs cost more than the decode.
        """
        while self._in_flight:
            if not self._finished:
                if self._in_flight <= cap:
                    return
                # A small cap keeps most of its rows in flight while it waits.
                batch = max(1, cap // 4) if cap else WAKE_AFTER_ROWS
                self._wait_for(min(self._in_flight, WAKE_AFTER_ROWS, batch))
            future, element = self._finished.popleft()
            self._in_flight -= 1
            yield self._result(future, element)

    def process(
        self,
        row: ImageRow,
        timestamp: Any = beam.DoFn.TimestampParam,
        window: Any = beam.DoFn.WindowParam,
    ) -> Iterator[Any]:
        element = WindowedValue(row, timestamp, (window,))
        future = self._submit(row)
        self._in_flight += 1
        future.add_done_callback(lambda f: self._on_done(f, element))
        yield from self._emit(self._fetch.concurrency)

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._emit(0)
