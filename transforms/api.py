"""The public API: `LabelImages` for Beam pipelines, `classify` for one-off use.

Both are thin layers over the same spec, handlers, fetch/decode/preprocess and
postprocess code the `label-images` job runs, so a notebook gets exactly the
scores the pipeline writes.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from PIL import Image

from transforms.errors import ErrorCode, RowError
from transforms.fetch_decode import load_image, preprocess
from transforms.images.fetch import Fetcher
from transforms.label import LabelImageRows, make_handler
from transforms.model.preprocess import ImagePreprocessor
from transforms.models import MODELS_OPTION, NamedSpec, model_columns, named_specs
from transforms.options import check_keywords, parse_value
from transforms.resolve import resolve_loaded, resolve_models
from transforms.rows import ImageRow, RecordFormat
from transforms.spec import LabelingSpec


def _models(where: str, models: Any, options: dict[str, Any]) -> tuple[NamedSpec, ...]:
    """The models of a `LabelImages` or `classify` call: its options alone, or
    with `models` (a list of entries, as the job's `models:`) one per entry."""
    if models is None:
        return (NamedSpec(None, LabelingSpec.from_options(where, options)),)
    check_keywords(LabelingSpec, options, where)
    return named_specs(options, parse_value("models", MODELS_OPTION, models))


def _as_mapping(element: Any) -> dict[str, Any] | None:
    if isinstance(element, Mapping):
        return dict(element)
    if isinstance(element, beam.Row) or hasattr(element, "_asdict"):
        return dict(element._asdict())
    return None


def to_image_row(
    element: Any, *, image_field: str, uri_field: str, keep_image_field: bool = False
) -> ImageRow:
    """Any supported element as an `ImageRow`; unsupported ones carry an error."""
    if isinstance(element, ImageRow):
        return element
    if isinstance(element, str):
        return ImageRow(index="", uri=element, values={uri_field: element})
    if isinstance(element, (bytes, bytearray, memoryview)):
        return ImageRow(index="", uri=None, image=bytes(element))
    if isinstance(element, Image.Image):
        return ImageRow(index="", uri=None, image=element)
    values = _as_mapping(element)
    if values is None:
        error = RowError(
            ErrorCode.UNSUPPORTED_ELEMENT,
            f"cannot label a {type(element).__name__}; expected a URI string, bytes, a PIL "
            f"image, or a dict/Row with a {image_field!r} or {uri_field!r} field",
        )
        return ImageRow(index="", uri=None, error=error)
    image = values.get(image_field)
    uri = values.get(uri_field)
    if isinstance(image, Mapping):  # Hugging Face datasets' Image: {bytes, path}
        uri = uri or image.get("path")
        image = image.get("bytes")
    if image is not None and not isinstance(image, (bytes, bytearray, Image.Image)):
        error = RowError(
            ErrorCode.UNSUPPORTED_ELEMENT,
            f"field {image_field!r} holds a {type(image).__name__}, not bytes or a PIL image",
        )
        return ImageRow(index="", uri=None, values=values, error=error)
    if image is not None and not keep_image_field:
        values.pop(image_field, None)
    return ImageRow(
        index="",
        uri=str(uri) if uri is not None else None,
        values=values,
        image=bytes(image) if isinstance(image, bytearray) else image,
    )


class _ToImageRows(beam.DoFn):
    def __init__(self, image_field: str, uri_field: str, keep_image_field: bool) -> None:
        self._kwargs = {
            "image_field": image_field,
            "uri_field": uri_field,
            "keep_image_field": keep_image_field,
        }

    def process(self, element: Any) -> Any:
        if isinstance(element, tuple) and len(element) == 2 and not isinstance(element, beam.Row):
            key, value = element
            row = to_image_row(value, **self._kwargs)  # type: ignore[arg-type]
            yield dataclasses.replace(row, values={**row.values, _KEY: key})
        else:
            yield to_image_row(element, **self._kwargs)  # type: ignore[arg-type]


_KEY = "__label_images_key__"


def _restore_key(record: dict[str, Any]) -> Any:
    if _KEY in record:
        key = record.pop(_KEY)
        return key, record
    return record


class LabelImages(beam.PTransform):
    """Label images inside your own Beam pipeline.

    Elements may be URI strings, encoded image `bytes`, `PIL.Image.Image`s,
    dicts or `beam.Row`s with an image field (bytes, PIL, or a Hugging Face
    `{"bytes", "path"}` struct) or a URI field, or `(key, element)` pairs. The
    output has one dict per element: its fields (the image bytes dropped unless
    `keep_image_field`) plus `label`, `score`, `labels`, `scores`, `status`
    and `error`, with the same semantics as the `label-images` job, which is
    built from this transform. `(key, element)` pairs come out as
    `(key, record)`; for bare bytes or PIL images there is nothing to join on,
    so pass keys or dicts when you need to match results to inputs.

    Example::

        with beam.Pipeline() as p:
            labeled = (
                p
                | beam.Create([{"id": 1, "uri": "gs://bucket/cat.jpg"}])
                | LabelImages(model="default", top_k=3)
            )

    Every option is keyword-only and checked here, when the pipeline is built,
    and so is the model (`transforms.spec.resolve`: its task, and weights that
    transformers would initialize at random); an unknown option is a TypeError
    that names it, a bad value a `ConfigError` with the CLI's message.

    Args:
        image_field, uri_field: field names for dict/Row elements.
        keep_image_field: keep image bytes in the output dicts.
        models: several models in one pass, as the job's `models:`: a list of
            entries, each a `name` and that model's options (the other options
            are every entry's defaults). Each image is decoded once; the
            output has each model's columns under its name (`cls_label` ...)
            and a row `status` that is `ok` when every model labeled it.
        options: any `LabelingSpec` option, named as the CLI flag in underscores:
            `model`, `task`, `candidate_labels`, `hypothesis_template`, `top_k`,
            `function_to_apply`, `revision`, `device`, `precision`, `batch_size`,
            `fast_decode`, `fetch_timeout`, `torch_threads`, ...
    """

    def __init__(
        self,
        *,
        image_field: str = "image",
        uri_field: str = "uri",
        keep_image_field: bool = False,
        models: Any = None,
        **options: Any,
    ) -> None:
        super().__init__()
        named = _models("LabelImages", models, options)
        self.models = tuple(model for model, _ in resolve_models(named, local=False))
        self.spec = self.models[0].spec
        self._image_field = image_field
        self._uri_field = uri_field
        self._keep_image_field = keep_image_field
        fmt = RecordFormat(models=model_columns(self.models))
        self._rows = LabelImageRows.of_models(self.models, fmt)

    def preload(self) -> None:
        """Load the model in the background now, for a run in this process.

        Only useful with an in-process runner (the local default); a runner
        with separate worker processes loads its own copies.
        """
        self._rows.preload()

    def expand(self, elements: beam.PCollection) -> beam.PCollection:
        rows = elements | "ToImageRows" >> beam.ParDo(
            _ToImageRows(self._image_field, self._uri_field, self._keep_image_field)
        )
        records = rows | "Label" >> self._rows
        return records | "RestoreKeys" >> beam.Map(_restore_key)


# ---- classify: the seed's call style, no Beam -----------------------------------

#: Models `classify` keeps loaded, the most recently used first; each distinct
#: set of options is one entry, and the oldest is dropped past this many.
CLASSIFY_CACHE_SIZE = 4


@dataclass(frozen=True)
class _Loaded:
    spec: LabelingSpec  # resolved
    handler: Any
    model: Any
    preprocessor: ImagePreprocessor


_CACHE: OrderedDict[LabelingSpec, _Loaded] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _loaded(spec: LabelingSpec) -> _Loaded:
    """The loaded model of `spec`'s options, from the cache or loaded now."""
    with _CACHE_LOCK:
        if spec in _CACHE:
            _CACHE.move_to_end(spec, last=False)
            return _CACHE[spec]
        resolved = resolve_loaded(spec, local=True)
        handler = make_handler(resolved.spec)
        handler.preload(resolved.weights)  # type: ignore[attr-defined]
        preprocessor = ImagePreprocessor(resolved.spec.model_spec)
        preprocessor.setup()
        entry = _Loaded(resolved.spec, handler, handler.load_model(), preprocessor)
        _CACHE[spec] = entry
        _CACHE.move_to_end(spec, last=False)
        while len(_CACHE) > CLASSIFY_CACHE_SIZE:
            _CACHE.popitem(last=True)
        return entry


def classify(images: Any, *, models: Any = None, **options: Any) -> Any:
    """Label images in memory, in the style of `transformers.pipeline`.

    Args:
        images: one image or a list: paths, URLs (any allowed scheme), encoded
            bytes or PIL images.
        models: several models at once, as the job's `models:` (a list of
            entries, each a `name` and that model's options); each image is
            decoded once.
        options: any `LabelingSpec` option (`model`, `task`, `candidate_labels`,
            `hypothesis_template`, `top_k`, `function_to_apply`, `device`,
            `batch_size`, ...), as for `LabelImages` and the CLI; an unknown
            name is a TypeError naming it, a bad value a `ConfigError`.

    Returns:
        For one image, a list of ``{"label", "score"}`` dicts, best first (with
        `threshold`, those scoring at least it: possibly none); for a list, one
        such list per image. With ``embeddings=True`` each image's result is
        ``{"labels": [...], "embedding": float32 array}`` instead. With
        `models`, each image's result is a dict of those results by model
        name. The scores are exactly those the pipeline writes (same
        preprocessing, handler and postprocessing).

    Raises:
        ValueError: for an image that cannot be fetched, decoded or labeled,
            with the same error code the pipeline would write.

    Example::

        classify("cat.jpg", top_k=2)
        # [{'label': 'tiger cat', 'score': 0.39}, {'label': 'Egyptian cat', 'score': 0.34}]
    """
    single = not isinstance(images, (list, tuple))
    inputs = [images] if single else list(images)
    loaded = [(m.name, _loaded(m.spec)) for m in _models("classify", models, options)]
    first = loaded[0][1].spec  # the options of the whole pass are every model's
    draft_side = (
        max(entry.preprocessor.draft_side for _, entry in loaded) if first.fast_decode else None
    )
    fetcher = Fetcher(first.fetch)
    try:
        decoded = []
        for item in inputs:
            row = to_image_row(item, image_field="image", uri_field="uri")
            try:
                decoded.append(
                    load_image(row, fetcher=fetcher, decode=first.decode, draft_side=draft_side)
                )
            except RowError as e:
                raise ValueError(str(e)) from e
    finally:
        fetcher.close()
    by_model = {name: _run(entry, decoded) for name, entry in loaded}
    if models is None:
        results = by_model[None]
    else:
        results = [{str(name): by_model[name][i] for name, _ in loaded} for i in range(len(inputs))]
    return results[0] if single else results


def _run(loaded: _Loaded, images: list[Image.Image]) -> list[Any]:
    """One model's results for decoded images, as `classify` returns them."""
    pixel_values = []
    for image in images:
        try:
            pixel_values.append(preprocess(loaded.preprocessor, image))
        except RowError as e:
            raise ValueError(str(e)) from e
    results: list[Any] = []
    # The handler runs the images in forward passes of the batch size.
    for result in loaded.handler.run_inference(pixel_values, loaded.model):
        if isinstance(result, RowError):
            raise ValueError(str(result))
        labels = [
            {"label": label, "score": score}
            for label, score in zip(result.labels, result.scores, strict=True)
        ]
        if loaded.spec.embeddings:
            results.append({"labels": labels, "embedding": result.embedding})
        else:
            results.append(labels)
    return results
