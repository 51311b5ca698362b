"""Tier 2: the graph under TestPipeline, with a fake model and real fetch/decode."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from transforms.errors import ErrorCode, RowError
from transforms.label import LabelImageRows
from transforms.model.inference import isolate_failures
from transforms.rows import ImageRow, Prediction


class FakePreprocessor:
    """Mean colour of the image as a 3-vector; brightness decides the label."""

    draft_side = 64

    def setup(self) -> None:
        pass

    def __call__(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        return [np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) for im in images]


class FakeModel:
    """Beam keeps a weak reference to the model, so it must be an object."""


class FakeHandler(ModelHandler[np.ndarray, "Prediction | RowError", FakeModel]):
    """'bright' or 'dark'; an all-red image makes the whole batch raise."""

    def __init__(self) -> None:
        super().__init__(min_batch_size=3, max_batch_size=3)

    def load_model(self) -> FakeModel:
        return FakeModel()

    def run_inference(
        self, batch: Sequence[np.ndarray], model: FakeModel, inference_args: Any = None
    ) -> Iterable[Prediction | RowError]:
        if any(x[0] > 250 and x[1] < 5 for x in batch):
            raise RuntimeError("red images crash this model")
        return [
            Prediction(["bright", "dark"], [0.9, 0.1])
            if x.mean() > 127
            else Prediction(["dark", "bright"], [0.8, 0.2])
            for x in batch
        ]


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name, colour in [("white", "white"), ("black", "black"), ("red", "red")]:
        path = tmp_path / f"{name}.png"
        Image.new("RGB", (20, 20), colour).save(path)
        paths[name] = str(path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off after the JPEG marker")
    paths["broken"] = str(tmp_path / "broken.jpg")
    return paths


def _rows(uris: list[str | None]) -> list[ImageRow]:
    return [ImageRow(index=f"0:{i}", uri=u, values={"uri": u, "n": i}) for i, u in enumerate(uris)]


def _summary(records: Iterable[dict[str, Any]]) -> list[tuple[int, str, str | None, str | None]]:
    return sorted(
        (r["n"], r["status"], r["label"], (r["error"] or "").split(":")[0] or None) for r in records
    )


def test_every_row_comes_out_once_with_its_status(images: dict[str, str], tmp_path: Path) -> None:
    uris: list[str | None] = [
        images["white"],
        images["black"],
        images["white"],  # duplicate URI: a distinct row
        str(tmp_path / "missing.png"),
        images["broken"],
        "",
        "ftp://example.org/x.png",
    ]
    with BeamTestPipeline() as p:
        records = p | beam.Create(_rows(uris)) | LabelImageRows(FakeHandler(), FakePreprocessor())
        assert_that(
            records
            | beam.Map(
                lambda r: (
                    r["n"],
                    r["status"],
                    r["label"],
                    (r["error"] or "").split(":")[0] or None,
                )
            ),
            equal_to(
                [
                    (0, "ok", "bright", None),
                    (1, "ok", "dark", None),
                    (2, "ok", "bright", None),
                    (3, "fetch_error", None, "not_found"),
                    (4, "decode_error", None, "truncated"),
                    (5, "invalid_input", None, "empty_uri"),
                    (6, "invalid_input", None, "unsupported_scheme"),
                ]
            ),
        )


def test_a_failing_batch_is_retried_image_by_image(images: dict[str, str]) -> None:
    """Only the image that breaks the model gets inference_error (dead-letter path)."""

    class Localizing(FakeHandler):
        """The fake model behind the same isolation our handlers use."""

        def run_inference(
            self, batch: Sequence[np.ndarray], model: FakeModel, inference_args: Any = None
        ) -> Iterable[Prediction | RowError]:
            parent = super().run_inference
            return isolate_failures(batch, lambda b: parent(b, model))

    uris: list[str | None] = [images["white"], images["red"], images["black"]]
    with BeamTestPipeline() as p:
        records = (
            p
            | beam.Create(_rows(uris))
            | LabelImageRows(
                Localizing(),
                FakePreprocessor(),
            )
        )
        assert_that(
            records | beam.Map(lambda r: (r["n"], r["status"], r["label"])),
            equal_to([(0, "ok", "bright"), (1, "inference_error", None), (2, "ok", "dark")]),
        )


def test_batches_that_escape_the_handler_become_error_rows(images: dict[str, str]) -> None:
    """A handler that raises for a whole batch: the batch is retried image by image
    around it, so only the image that breaks the model fails; one row per input."""
    uris: list[str | None] = [images["white"], images["red"], images["black"], None]
    with BeamTestPipeline() as p:
        records = (
            p
            | beam.Create(_rows(uris))
            | LabelImageRows(
                FakeHandler(),
                FakePreprocessor(),
            )
        )
        assert_that(
            records | beam.Map(lambda r: (r["n"], r["status"], (r["error"] or "").split(":")[0])),
            equal_to(
                [
                    (0, "ok", ""),
                    (1, "inference_error", ErrorCode.INFERENCE_FAILED.value),
                    (2, "ok", ""),
                    (3, "invalid_input", ErrorCode.EMPTY_URI.value),
                ]
            ),
        )


#: When each image was preprocessed and each record came out (one process: FnApiRunner).
_TIMES: dict[str, list[float]] = {"preprocessed": [], "recorded": []}


class SlowPreprocessor(FakePreprocessor):
    def __call__(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        time.sleep(0.05)
        _TIMES["preprocessed"].append(time.monotonic())
        return super().__call__(images)


def _recorded(record: dict[str, Any]) -> dict[str, Any]:
    _TIMES["recorded"].append(time.monotonic())
    return record


def test_records_stream_out_while_the_bundle_is_still_decoding(
    images: dict[str, str],
) -> None:
    """No Flatten in the labeling graph: Beam's local runner would hold every record
    of the bundle behind it (memory, and no row committed before the end)."""
    _TIMES["preprocessed"].clear()
    _TIMES["recorded"].clear()
    pair: list[str | None] = [images["white"], images["black"]]
    uris = pair * 20 + [images["broken"]]
    with BeamTestPipeline() as p:
        _ = (
            p
            | beam.Create(_rows(uris))
            | beam.Reshuffle()
            | LabelImageRows(FakeHandler(), SlowPreprocessor())
            | beam.Map(_recorded)
        )
    assert len(_TIMES["recorded"]) == len(uris)
    assert min(_TIMES["recorded"]) < max(_TIMES["preprocessed"]) - 0.5


def test_rows_invalid_at_read_time_skip_fetch() -> None:
    row = ImageRow(
        index="0:0",
        uri="/x.png",
        values={"uri": "/x.png", "n": 0},
        error=RowError(ErrorCode.MALFORMED_ROW, "line 3: bad"),
    )
    with BeamTestPipeline() as p:
        records = (
            p
            | beam.Create([row])
            | LabelImageRows(
                FakeHandler(),
                FakePreprocessor(),
            )
        )
        assert_that(
            records | beam.Map(lambda r: (r["status"], r["error"])),
            equal_to([("invalid_input", "malformed_row: line 3: bad")]),
        )
