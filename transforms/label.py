"""`LabelImages`: fetch, decode, preprocess, batch, infer and shape output rows.

    ImageRow ─► FetchDecodePreprocess ─► RunInference(KeyedModelHandler) ─► record
                      │ errors                    │ failed batches
                      └──────────────► error record ◄─┘

Every input row leaves as exactly one output record (a dict with the passthrough
columns plus `label`, `score`, `labels`, `scores`, `status` and `error`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from transforms.decode import DEFAULT_MAX_PIXELS, decode_image
from transforms.errors import ErrorCode, RowError, Status
from transforms.fetch import FetchOptions, fetch_bytes
from transforms.image_classification import METRICS_NAMESPACE
from transforms.preprocess import Preprocessor
from transforms.rows import ImageRow, Prediction, error_record, ok_record

logger = logging.getLogger(__name__)

ERRORS_TAG = "errors"


@dataclass(frozen=True)
class DecodeOptions:
    """How images are decoded.

    Attributes:
        max_pixels: decompression-bomb limit.
        draft: decode large JPEGs at reduced scale (see `decode_image`).
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True


def count_error(error: RowError) -> None:
    """Beam counters per status and per error code (shown in Dataflow's UI)."""
    Metrics.counter(METRICS_NAMESPACE, f"rows_{error.status.value}").inc()
    Metrics.counter(METRICS_NAMESPACE, f"error_{error.code.value}").inc()


class FetchDecodePreprocess(beam.DoFn):
    """Turns an `ImageRow` into `(row, pixel_values)`, or `(row, RowError)` on the
    `errors` output. Never raises for a bad image.

    Example::

        tensors, errors = rows | beam.ParDo(
            FetchDecodePreprocess(ImagePreprocessor(spec))
        ).with_outputs(ERRORS_TAG, main="tensors")
    """

    def __init__(
        self,
        preprocessor: Preprocessor,
        fetch: FetchOptions | None = None,
        decode: DecodeOptions | None = None,
    ) -> None:
        self._preprocessor = preprocessor
        self._fetch = fetch or FetchOptions()
        self._decode = decode or DecodeOptions()
        self._draft_side: int | None = None

    def setup(self) -> None:
        self._preprocessor.setup()
        self._draft_side = self._preprocessor.draft_side if self._decode.draft else None

    def process(self, row: ImageRow) -> Iterator[Any]:
        try:
            if row.error is not None:
                raise row.error
            data = fetch_bytes(row.uri or "", self._fetch)
            image = decode_image(
                data, draft_side=self._draft_side, max_pixels=self._decode.max_pixels
            )
            try:
                (pixel_values,) = self._preprocessor([image])
            except Exception as e:
                raise RowError(
                    ErrorCode.DECODE_FAILED, f"preprocessing failed: {type(e).__name__}: {e}"
                ) from e
        except RowError as error:
            count_error(error)
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, (row, error))
            return
        yield row, pixel_values


def _to_record(item: tuple[ImageRow, Prediction | RowError]) -> dict[str, Any]:
    row, result = item
    if isinstance(result, RowError):
        count_error(result)
        return error_record(row, result)
    Metrics.counter(METRICS_NAMESPACE, f"rows_{Status.OK.value}").inc()
    return ok_record(row, result)


def _failed_batch_records(failure: Any) -> Iterator[dict[str, Any]]:
    """Records for a batch that escaped the handler's own per-image retry."""
    batch, exc_info = failure
    message = (
        str(exc_info[1]) if isinstance(exc_info, tuple) and len(exc_info) > 1 else str(exc_info)
    )
    for row, _ in batch:
        error = RowError(ErrorCode.INFERENCE_FAILED, message)
        count_error(error)
        yield error_record(row, error)


@dataclass(frozen=True)
class LabelingOptions:
    """Options of `LabelImages` besides the model handler."""

    fetch: FetchOptions = field(default_factory=FetchOptions)
    decode: DecodeOptions = field(default_factory=DecodeOptions)


class LabelImages(beam.PTransform):
    """Labels a PCollection of `ImageRow` into output records, one per row.

    Example::

        handler = ImageClassificationModelHandler(ModelSpec("default"), top_k=5)
        records = rows | LabelImages(handler, ImagePreprocessor(ModelSpec("default")))

    Args:
        handler: the model handler (image or zero-shot classification).
        preprocessor: the model's image preprocessing, run before batching.
        options: fetch and decode options.
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
        self._options = options or LabelingOptions()

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        fetched = rows | "FetchAndDecode" >> beam.ParDo(
            FetchDecodePreprocess(self._preprocessor, self._options.fetch, self._options.decode)
        ).with_outputs(ERRORS_TAG, main="tensors")
        inferred, dead_letters = (
            fetched.tensors
            | "RunInference"
            >> RunInference(KeyedModelHandler(self._handler)).with_exception_handling()
        )
        labeled = inferred | "ToRecords" >> beam.Map(_to_record)
        failed_fetch = fetched[ERRORS_TAG] | "ErrorRecords" >> beam.MapTuple(
            lambda row, error: error_record(row, error)
        )
        failed_batches = dead_letters.failed_inferences | "FailedBatchRecords" >> beam.FlatMap(
            _failed_batch_records
        )
        return (labeled, failed_fetch, failed_batches) | "MergeRecords" >> beam.Flatten()
