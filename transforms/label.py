"""`LabelImageRows`: fetch, decode, preprocess, batch, infer and shape output rows.

    ImageRow ─► FetchDecodePreprocess ─► RunInference(KeyedModelHandler(PassRowErrors)) ─► record
                  (row, pixels) or (row, RowError): one stream, errors pass the model by

One stream, no Flatten: Beam's in-process runner (FnApiRunner) runs whatever
follows a Flatten only once the whole bundle upstream is done, so a Flatten
here held every record of a local run in memory and delayed the first
committed row to the end of the run (32 s instead of ~9 s for 1,000 images).

Every input row leaves as exactly one output record (a dict with the passthrough
columns plus `label`, `score`, `labels`, `scores`, `status` and `error`).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image, ImageOps

from transforms.allocator import tune_malloc
from transforms.errors import ErrorCode, RowError
from transforms.images.decode import DecodeOptions, decode_image
from transforms.images.fetch import Fetcher, FetchOptions
from transforms.metrics import count_error, count_ok
from transforms.model.image_classification import ImageClassificationModelHandler
from transforms.model.inference import isolate_failures
from transforms.model.preprocess import ImagePreprocessor, Preprocessor
from transforms.model.zero_shot import ZeroShotModelHandler
from transforms.rows import ImageRow, Prediction, RecordFormat
from transforms.spec import ZERO_SHOT, LabelingSpec
from transforms.uri import scheme_of

logger = logging.getLogger(__name__)


def load_pixel_values(
    row: ImageRow,
    *,
    fetcher: Fetcher,
    preprocessor: Preprocessor,
    decode: DecodeOptions,
    draft_side: int | None,
    data: bytes | None = None,
) -> np.ndarray:
    """One row's `pixel_values`: from `data`, its inline image, or the bytes at its URI.

    Raises:
        RowError: for any failure of this row.
    """
    if row.error is not None:
        raise row.error
    image: Image.Image
    if data is None and isinstance(row.image, Image.Image):
        # As transformers' load_image does for PIL inputs.
        image = (ImageOps.exif_transpose(row.image) or row.image).convert("RGB")
    else:
        if data is None:
            data = row.image if row.image is not None else fetcher.fetch(row.uri)
        image = decode_image(data, draft_side=draft_side, max_pixels=decode.max_pixels)
        del data
    try:
        (pixel_values,) = preprocessor([image])
    except Exception as e:
        raise RowError(
            ErrorCode.DECODE_FAILED, f"preprocessing failed: {type(e).__name__}: {e}"
        ) from e
    return pixel_values


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


class FetchDecodePreprocess(beam.DoFn):
    """Turns an `ImageRow` into `(row, pixel_values)`, or `(row, RowError)` for a
    row that failed (in the same output). Never raises for a bad image.

    Up to `fetch.concurrency` rows are in flight, so network latency overlaps:
    http(s) downloads wait on the fetcher's event loop, gs:// and s3:// on an
    I/O thread pool, and `decode.threads` threads decode and preprocess
    (Pillow releases the GIL while it decodes). Results are emitted as they
    complete, in any order.

    Example::

        spec = LabelingSpec(model="default")
        pre = ImagePreprocessor(spec.model_spec)
        keyed = rows | beam.ParDo(FetchDecodePreprocess(pre, spec.fetch, spec.decode))
    """

    def __init__(
        self,
        preprocessor: Preprocessor,
        fetch: FetchOptions,
        decode: DecodeOptions,
    ) -> None:
        self._preprocessor = preprocessor
        self._fetch = fetch
        self._decode = decode

    def setup(self) -> None:
        if self._decode.tune_malloc:
            tune_malloc()
        self._preprocessor.setup()
        self._draft_side = self._preprocessor.draft_side if self._decode.fast else None
        self._fetcher = Fetcher(self._fetch)
        # Decoding runs on a few threads only; network fetches wait elsewhere
        # (http(s) on the fetcher's event loop, gs:// and s3:// on an I/O pool),
        # so dozens of downloads in flight never mean dozens of threads
        # allocating decode buffers (each thread grows its own malloc arena).
        self._decode_pool = ThreadPoolExecutor(
            max_workers=self._decode.threads,
            thread_name_prefix="decode",
            initializer=single_threaded_torch_in_this_thread,
        )
        self._io_pool: ThreadPoolExecutor | None = None
        # Rows submitted and not yet emitted; finished ones wait in `_finished`
        # (their futures' callbacks put them there), so emitting one costs O(1)
        # instead of a scan of every row in flight.
        self._in_flight = 0
        self._finished: queue.SimpleQueue[tuple[Future[np.ndarray], WindowedValue]] = (
            queue.SimpleQueue()
        )

    def teardown(self) -> None:
        self._decode_pool.shutdown(wait=True, cancel_futures=True)
        if self._io_pool is not None:
            self._io_pool.shutdown(wait=True, cancel_futures=True)
        self._fetcher.close()

    def load(self, row: ImageRow, data: bytes | None = None) -> np.ndarray:
        """Decode and preprocess one row, fetching it first unless `data` (or the
        row's own image) is given. Runs on a decode thread.

        Raises:
            RowError: for any failure of this row.
        """
        return load_pixel_values(
            row,
            fetcher=self._fetcher,
            preprocessor=self._preprocessor,
            decode=self._decode,
            draft_side=self._draft_side,
            data=data,
        )

    def _submit(self, row: ImageRow) -> Future[np.ndarray]:
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
        result: Future[np.ndarray] = Future()

        def decoded(future: Future[np.ndarray]) -> None:
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

    def _result(self, future: Future[np.ndarray], element: WindowedValue) -> Any:
        row = element.value
        try:
            return element.with_value((row, future.result()))
        except RowError as e:
            failure = e
        except Exception as e:  # a bug must still give a row, not kill the bundle
            failure = RowError(ErrorCode.DECODE_FAILED, f"{type(e).__name__}: {e}")
        # Counted once, in `_to_record`, where every row's final result arrives.
        return element.with_value((row, failure))

    def _emit(self, cap: int) -> Iterator[Any]:
        """Emit every finished row; then wait while more than `cap` are in flight."""
        while self._in_flight and (self._in_flight > cap or not self._finished.empty()):
            future, element = self._finished.get()  # waits only when over the cap
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
        future.add_done_callback(lambda f: self._finished.put((f, element)))
        yield from self._emit(self._fetch.concurrency)

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._emit(0)


def _to_record(item: tuple[ImageRow, Prediction | RowError], fmt: RecordFormat) -> dict[str, Any]:
    row, result = item
    if isinstance(result, RowError):
        count_error(result)
        return fmt.error(row, result)
    count_ok()
    return fmt.ok(row, result)


class PassRowErrors(ModelHandler[Any, Any, Any]):
    """Wraps a model handler so a batch may hold rows that already failed.

    Examples that are `RowError`s pass the model by and come out as they went
    in; the others are run by the wrapped handler. A batch the wrapped handler
    fails on as a whole is retried image by image, so only the images that fail
    on their own get `inference_failed` (Beam's dead-letter output would need a
    Flatten, see the module docstring). Everything else is delegated.
    """

    def __init__(self, handler: ModelHandler[Any, Any, Any]) -> None:
        super().__init__()
        self._handler = handler

    def load_model(self) -> Any:
        return self._handler.load_model()

    def run_inference(
        self, batch: Sequence[Any], model: Any, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Any]:
        results: list[Any] = list(batch)
        index = [i for i, example in enumerate(batch) if not isinstance(example, RowError)]
        if not index:
            return results

        def predict(examples: Sequence[Any]) -> Iterable[Any]:
            return self._handler.run_inference(examples, model, inference_args)

        for i, result in zip(
            index, isolate_failures([batch[i] for i in index], predict), strict=True
        ):
            results[i] = result
        return results

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return self._handler.get_num_bytes([x for x in batch if not isinstance(x, RowError)])

    def get_metrics_namespace(self) -> str:
        return self._handler.get_metrics_namespace()

    def get_resource_hints(self) -> dict[str, Any]:
        return self._handler.get_resource_hints()

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return self._handler.batch_elements_kwargs()

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        self._handler.validate_inference_args(inference_args)

    def update_model_path(self, model_path: str | None = None) -> None:
        self._handler.update_model_path(model_path)

    def share_model_across_processes(self) -> bool:
        return self._handler.share_model_across_processes()

    def model_copies(self) -> int:
        return self._handler.model_copies()


def make_handler(spec: LabelingSpec) -> ModelHandler[np.ndarray, Prediction | RowError, Any]:
    """The RunInference handler for a resolved spec."""
    if spec.task == ZERO_SHOT:
        return ZeroShotModelHandler(spec.handler)
    return ImageClassificationModelHandler(spec.handler)


@dataclass(frozen=True)
class LabelingOptions:
    """Options of `LabelImageRows` besides the model: fetch and decode options
    (from a `LabelingSpec`) and the output record format."""

    fetch: FetchOptions
    decode: DecodeOptions
    record_format: RecordFormat = field(default_factory=RecordFormat)

    @classmethod
    def of(cls, spec: LabelingSpec, record_format: RecordFormat | None = None) -> LabelingOptions:
        """A spec's options; the embedding column follows the spec."""
        fmt = dataclasses.replace(record_format or RecordFormat(), embeddings=spec.embeddings)
        return cls(spec.fetch, spec.decode, fmt)


class LabelImageRows(beam.PTransform):
    """Labels a PCollection of `ImageRow` into output records, one per row.

    The core of `transforms.LabelImages` (which also accepts URIs, bytes, PIL
    images and dicts); use that one unless you build `ImageRow`s yourself.

    Example::

        spec = resolve(LabelingSpec(model="default", top_k=5), local=False)
        handler = ImageClassificationModelHandler(spec.handler)
        records = rows | LabelImageRows(
            handler, ImagePreprocessor(spec.model_spec), LabelingOptions.of(spec)
        )

    Args:
        handler: the model handler (image or zero-shot classification).
        preprocessor: the model's image preprocessing, run before batching.
        options: fetch and decode options, and the output record format
            (default: those of `LabelingSpec()`).
    """

    def __init__(
        self,
        handler: ModelHandler[np.ndarray, Prediction | RowError, Any],
        preprocessor: Preprocessor,
        options: LabelingOptions | None = None,
    ) -> None:
        super().__init__()
        self._handler = handler
        self._preprocessor = preprocessor
        self._options = options or LabelingOptions.of(LabelingSpec())

    @classmethod
    def of(cls, spec: LabelingSpec, record_format: RecordFormat | None = None) -> LabelImageRows:
        """The rows labeler of a resolved spec: its handler, its model's
        preprocessor, its fetch and decode options."""
        return cls(
            make_handler(spec),
            ImagePreprocessor(spec.model_spec),
            LabelingOptions.of(spec, record_format),
        )

    def preload(self, weights: Any = None) -> None:
        """Start loading the model and its processor in this process now, for an
        in-process run (they load while Beam plans and reads). `weights`: the
        model `resolve_loaded` loaded to check it, so it is not read again.

        A runner with separate worker processes loads its own copies.
        """
        preload = getattr(self._handler, "preload", None)
        if preload is not None:
            preload(weights)
        preload = getattr(self._preprocessor, "preload", None)
        if preload is not None:
            preload()

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        fmt = self._options.record_format
        return (
            rows
            | "FetchAndDecode"
            >> beam.ParDo(
                FetchDecodePreprocess(self._preprocessor, self._options.fetch, self._options.decode)
            )
            | "RunInference" >> RunInference(KeyedModelHandler(PassRowErrors(self._handler)))
            | "ToRecords" >> beam.Map(_to_record, fmt)
        )
