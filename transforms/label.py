"""`LabelImageRows`: fetch, decode, preprocess, batch, infer and shape output rows.

    ImageRow ─► FetchDecodePreprocess ─► RunInference(KeyedModelHandler(PassRowErrors)) ─► record
                  (row, pixels) or (row, RowError): one stream, errors pass the model by

With several models (`ModelStep`s), each image is decoded once and run
through each distinct preprocessor once; then the models run one after the
other on the same stream, each its own RunInference with its own batches:

    ImageRow ─► FetchDecodePreprocess ─► [Select ─► RunInference ─► Collect] per model ─► record
                  (row, pixels per preprocessor)   each model's result joins the row

One stream, no Flatten: Beam's in-process runner (FnApiRunner) runs whatever
follows a Flatten only once the whole bundle upstream is done, so a Flatten
here held every record of a local run in memory and delayed the first
committed row to the end of the run (32 s instead of ~9 s for 1,000 images).

Every input row leaves as exactly one output record (a dict with the passthrough
columns plus `label`, `score`, `labels`, `scores`, `status` and `error`, or
those of each model under its name).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from transforms.errors import RowError
from transforms.fetch_decode import (
    FetchDecodePreprocess,
    Pixels,
    single_threaded_torch_in_this_thread,
)
from transforms.images.decode import DecodeOptions
from transforms.images.fetch import FetchOptions
from transforms.metrics import count_error, count_ok
from transforms.model.image_classification import ImageClassificationModelHandler
from transforms.model.inference import isolate_failures
from transforms.model.preprocess import ImagePreprocessor, Preprocessor
from transforms.model.zero_shot import ZeroShotModelHandler
from transforms.models import NamedSpec
from transforms.rows import ImageRow, Prediction, RecordFormat
from transforms.spec import ZERO_SHOT, LabelingSpec

__all__ = [
    "FetchDecodePreprocess",
    "LabelImageRows",
    "LabelingOptions",
    "ModelStep",
    "PassRowErrors",
    "make_handler",
    "single_threaded_torch_in_this_thread",
]

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class ModelStep:
    """One model of a several-model pass: the name its columns take, its
    handler and its preprocessor (steps with equal preprocessors share one
    run of it: `share_key`)."""

    name: str
    handler: ModelHandler[np.ndarray, Prediction | RowError, Any]
    preprocessor: Preprocessor


def share_key(preprocessor: Preprocessor) -> Hashable:
    """Equal for preprocessors that give the same pixels (`ImagePreprocessor.
    share_key`); a preprocessor of another kind shares with itself only."""
    key = getattr(preprocessor, "share_key", None)
    return key() if callable(key) else ("object", id(preprocessor))


@dataclass(frozen=True)
class _Carry:
    """A row on its way through the models: its pixels per preprocessor (or
    the error it failed with before any model), and the models' results so far."""

    row: ImageRow
    pixels: tuple[np.ndarray | RowError | None, ...] | RowError
    results: tuple[Prediction | RowError, ...] = ()


def _start(item: tuple[ImageRow, Pixels | RowError]) -> _Carry:
    row, pixels = item
    return _Carry(row, pixels)


def _select(carry: _Carry, index: int, last: bool) -> tuple[_Carry, Any]:
    """(carry, this model's example): its preprocessor's pixels, or a RowError
    (the row's, or the preprocessor's on this image), which passes the model by.
    A model that is its preprocessor's last drops those pixels from the carry."""
    if isinstance(carry.pixels, RowError):
        return carry, carry.pixels
    example = carry.pixels[index]
    if last:
        pixels = carry.pixels[:index] + (None,) + carry.pixels[index + 1 :]
        carry = dataclasses.replace(carry, pixels=pixels)
    return carry, example


def _collect(item: tuple[_Carry, Prediction | RowError], model: str) -> _Carry:
    carry, result = item
    if not isinstance(carry.pixels, RowError):  # the row's own failure is counted once, per row
        if isinstance(result, RowError):
            count_error(result, model)
        else:
            count_ok(model)
    return dataclasses.replace(carry, results=(*carry.results, result))


def _carry_to_record(carry: _Carry, fmt: RecordFormat) -> dict[str, Any]:
    if isinstance(carry.pixels, RowError):
        count_error(carry.pixels)
        return fmt.record(carry.row, carry.pixels)
    failure = next((r for r in carry.results if isinstance(r, RowError)), None)
    if failure is None:
        count_ok()
    else:
        count_error(failure)
    return fmt.record(carry.row, carry.results)


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

    Several models: ``LabelImageRows(steps=[ModelStep("cls", ...), ...],
    options=...)``, with `options.record_format.models` naming the same models.

    Args:
        handler: the model handler (image or zero-shot classification).
        preprocessor: the model's image preprocessing, run before batching.
        options: fetch and decode options, and the output record format
            (default: those of `LabelingSpec()`).
        steps: instead of `handler` and `preprocessor`, several models.
    """

    def __init__(
        self,
        handler: ModelHandler[np.ndarray, Prediction | RowError, Any] | None = None,
        preprocessor: Preprocessor | None = None,
        options: LabelingOptions | None = None,
        *,
        steps: Sequence[ModelStep] = (),
    ) -> None:
        super().__init__()
        if steps and (handler is not None or preprocessor is not None):
            raise TypeError("give a handler and a preprocessor, or steps, not both")
        if not steps and (handler is None or preprocessor is None):
            raise TypeError("LabelImageRows needs a handler and a preprocessor (or steps)")
        self._steps = tuple(steps)
        self._handler = handler
        self._preprocessor = preprocessor
        self._options = options or LabelingOptions.of(LabelingSpec())
        if self._steps:
            names = [s.name for s in self._steps]
            if list(self._options.record_format.model_names) != names:
                raise ValueError(
                    f"the record format's models {list(self._options.record_format.model_names)} "
                    f"are not the steps' {names}"
                )
            # One run of each distinct preprocessor: `_uses[i]` is step i's.
            keys: list[Hashable] = []
            self._distinct: list[Preprocessor] = []
            self._uses: list[int] = []
            for step in self._steps:
                key = share_key(step.preprocessor)
                if key not in keys:
                    keys.append(key)
                    self._distinct.append(step.preprocessor)
                self._uses.append(keys.index(key))

    @classmethod
    def of(cls, spec: LabelingSpec, record_format: RecordFormat | None = None) -> LabelImageRows:
        """The rows labeler of a resolved spec: its handler, its model's
        preprocessor, its fetch and decode options."""
        return cls(
            make_handler(spec),
            ImagePreprocessor(spec.model_spec),
            LabelingOptions.of(spec, record_format),
        )

    @classmethod
    def of_models(
        cls, models: Sequence[NamedSpec], record_format: RecordFormat | None = None
    ) -> LabelImageRows:
        """The rows labeler of resolved models: `of` for a single unnamed one,
        else a step per model. `record_format` names the same models."""
        if len(models) == 1 and models[0].name is None:
            return cls.of(models[0].spec, record_format)
        first = models[0].spec
        steps = [
            ModelStep(str(m.name), make_handler(m.spec), ImagePreprocessor(m.spec.model_spec))
            for m in models
        ]
        options = LabelingOptions(first.fetch, first.decode, record_format or RecordFormat())
        return cls(steps=steps, options=options)

    @property
    def preprocessors(self) -> list[Preprocessor]:
        """The preprocessors that run, once each per image."""
        return list(self._distinct) if self._steps else [self._preprocessor]  # type: ignore[list-item]

    def preload(self, weights: Sequence[Any] | None = None) -> None:
        """Start loading the models and their processors in this process now,
        for an in-process run (they load while Beam plans and reads).
        `weights`: the models `resolve_loaded` loaded to check them, one per
        model (step), so none is read again.

        A runner with separate worker processes loads its own copies.
        """
        handlers = [s.handler for s in self._steps] or [self._handler]  # type: ignore[list-item]
        for handler, kept_weights in zip(handlers, weights or [None] * len(handlers), strict=True):
            preload = getattr(handler, "preload", None)
            if preload is not None:
                preload(kept_weights)
        for preprocessor in self.preprocessors:
            preload = getattr(preprocessor, "preload", None)
            if preload is not None:
                preload()

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        fmt = self._options.record_format
        if self._steps:
            return self._expand_steps(rows, fmt)
        return (
            rows
            | "FetchAndDecode"
            >> beam.ParDo(
                FetchDecodePreprocess(self._preprocessor, self._options.fetch, self._options.decode)  # type: ignore[arg-type]
            )
            | "RunInference" >> RunInference(KeyedModelHandler(PassRowErrors(self._handler)))  # type: ignore[arg-type]
            | "ToRecords" >> beam.Map(_to_record, fmt)
        )

    def _expand_steps(self, rows: beam.PCollection, fmt: RecordFormat) -> beam.PCollection:
        carried = (
            rows
            | "FetchAndDecode"
            >> beam.ParDo(
                FetchDecodePreprocess(self._distinct, self._options.fetch, self._options.decode)
            )
            | "StartModels" >> beam.Map(_start)
        )
        for i, step in enumerate(self._steps):
            index = self._uses[i]
            last = index not in self._uses[i + 1 :]
            carried = (
                carried
                | f"Select[{step.name}]" >> beam.Map(_select, index, last)
                | f"RunInference[{step.name}]"
                >> RunInference(KeyedModelHandler(PassRowErrors(step.handler)))
                | f"Collect[{step.name}]" >> beam.Map(_collect, step.name)
            )
        return carried | "ToRecords" >> beam.Map(_carry_to_record, fmt)
