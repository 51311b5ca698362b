"""Several models in one pass (`models:`): each image fetched and decoded once,
each model's columns equal to a run of that model alone and to
`transformers.pipeline`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, cast

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines.config import ConfigError, load_config
from tests.conftest import read_output, run_job
from transforms.label import LabelImageRows, LabelingOptions, ModelStep
from transforms.models import named_specs
from transforms.rows import ImageRow, ModelColumns, Prediction, RecordFormat
from transforms.spec import LabelingSpec

LABELS = ["a cat", "a dog", "a cup of coffee", "a rocket"]


@pytest.fixture(scope="module")
def manifest(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos, one missing file and one that is not an image."""
    root = tmp_path_factory.mktemp("several")
    (root / "not-an-image.jpg").write_bytes(b"hello")
    lines = [str(p) for p in sorted(photo_dir.iterdir())]
    lines += [str(root / "missing.jpg"), str(root / "not-an-image.jpg")]
    path = root / "manifest.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _entries(tiny_vit: Path, tiny_clip: Path, tiny_siglip: Path) -> list[dict[str, Any]]:
    return [
        {"name": "cls", "model": str(tiny_vit), "top_k": 3},
        {"name": "tags", "model": str(tiny_clip), "candidate_labels": LABELS, "embeddings": True},
        {
            "name": "sig",
            "model": str(tiny_siglip),
            "candidate_labels": LABELS,
            "threshold": 0.2,
            "top_k": 0,
        },
    ]


def _write_config(path: Path, manifest: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"input": str(manifest), "device": "cpu", "models": entries}))
    return path


class OnePass(NamedTuple):
    config: Path
    out: Path
    entries: list[dict[str, Any]]


@pytest.fixture(scope="module")
def one_pass(
    tmp_path_factory: pytest.TempPathFactory,
    manifest: Path,
    tiny_vit: Path,
    tiny_clip: Path,
    tiny_siglip: Path,
) -> OnePass:
    """One three-model pass over the manifest: its config, output and entries."""
    root = tmp_path_factory.mktemp("one-pass")
    entries = _entries(tiny_vit, tiny_clip, tiny_siglip)
    config = _write_config(root / "job.yaml", manifest, entries)
    assert run_job(["--config", str(config), "--output", str(root / "out")]) == 0
    return OnePass(config, root / "out", entries)


def _by_source(table: Any) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["source_file"], r["source_row"]): r for r in table.to_pylist()}


@pytest.mark.slow
def test_each_models_columns_equal_its_own_run_and_transformers_pipeline(
    tmp_path: Path, manifest: Path, one_pass: OnePass
) -> None:
    from transformers import pipeline

    entries = one_pass.entries
    several = _by_source(read_output(one_pass.out))
    assert len(several) == len(manifest.read_text().split())

    for entry in entries:
        model_name = entry["name"]
        flags = ["--input", str(manifest), "--device", "cpu", "--model", entry["model"]]
        for key, value in entry.items():
            if key in ("name", "model"):
                continue
            flag = "--" + key.replace("_", "-")
            if value is True:
                flags.append(flag)
            elif isinstance(value, list):
                flags += [flag, ",".join(value)]
            else:
                flags += [flag, str(value)]
        out = tmp_path / f"alone-{model_name}"
        assert run_job([*flags, "--output", str(out)]) == 0
        alone = _by_source(read_output(out))
        assert alone.keys() == several.keys()
        for source, row in alone.items():
            multi = several[source]
            assert multi[f"{model_name}_status"] == row["status"]
            assert multi[f"{model_name}_label"] == row["label"]
            assert multi[f"{model_name}_labels"] == row["labels"]
            if row["status"] != "ok":
                assert multi[f"{model_name}_error"] == row["error"]
                continue
            np.testing.assert_allclose(multi[f"{model_name}_scores"], row["scores"], atol=1e-6)
            if entry.get("embeddings"):
                a = np.array(multi[f"{model_name}_embedding"])
                b = np.array(row["embedding"])
                assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.9999

    # Against transformers.pipeline, image by image, for every ok row.
    ok = [r for r in several.values() if r["status"] == "ok"]
    assert len(ok) == len(several) - 2  # the missing file and the one that is no image
    paths = [r["uri"] for r in ok]
    vit, clip_dir, siglip = (e["model"] for e in entries)
    cls = pipeline("image-classification", model=vit, device="cpu")(paths, top_k=3)
    clip = pipeline("zero-shot-image-classification", model=clip_dir, device="cpu")
    sig = pipeline("zero-shot-image-classification", model=siglip, device="cpu")
    for row, seed in zip(ok, cls, strict=True):
        assert row["cls_labels"] == [s["label"] for s in seed]
        np.testing.assert_allclose(row["cls_scores"], [s["score"] for s in seed], atol=1e-4)
    for row, path in zip(ok, paths, strict=True):
        seed = clip(path, candidate_labels=LABELS)
        assert row["tags_labels"] == [s["label"] for s in seed][:5]
        np.testing.assert_allclose(row["tags_scores"], [s["score"] for s in seed][:5], atol=1e-4)
        tags = [s for s in sig(path, candidate_labels=LABELS) if s["score"] >= 0.2]
        assert row["sig_labels"] == [s["label"] for s in tags]
        np.testing.assert_allclose(row["sig_scores"], [s["score"] for s in tags], atol=1e-4)


@pytest.mark.slow
def test_one_pass_output_reads_everywhere_and_reports_per_model(
    tmp_path: Path, manifest: Path, one_pass: OnePass
) -> None:
    import duckdb
    import pandas as pd

    config, out, entries = one_pass
    table = read_output(out)
    names = table.schema.names
    assert names[:3] == ["uri", "source_file", "source_row"]
    for model in ("cls", "tags", "sig"):
        for column in ("label", "score", "labels", "scores", "status", "error"):
            assert f"{model}_{column}" in names
    assert "tags_embedding" in names and "cls_embedding" not in names
    assert names[-2:] == ["status", "error"]
    frame = pd.read_parquet(out)
    assert (frame["status"] == "ok").sum() == len(frame) - 2
    failed = frame[frame["status"] != "ok"]
    assert set(failed["cls_status"]) == set(failed["status"]) == {"fetch_error", "decode_error"}
    assert failed["error"].tolist() == failed["tags_error"].tolist()
    counts = duckdb.execute(
        f"select cls_status, count(*) from read_parquet('{out}/part-*.parquet') group by 1"
    ).fetchall()
    assert dict(counts)["ok"] == len(frame) - 2

    summary = json.loads((out / "__label_images__" / "summary.json").read_text())
    assert list(summary["models"]) == ["cls", "tags", "sig"]
    assert summary["models"]["tags"]["images_by_status"]["ok"] == len(frame) - 2
    assert summary["config"]["models"][0]["name"] == "cls"
    assert set(summary["config"]["effective"]["models"]) == {"cls", "tags", "sig"}
    labels = json.loads((out / "__label_images__" / "labels.json").read_text())
    assert labels["models"]["tags"] == LABELS
    report = (out / "__label_images__" / "report.html").read_text()
    for model in ("cls", "tags", "sig"):
        assert f'id="model-{model}"' in report
    meta = pq.read_schema(next(out.glob("part-*.parquet"))).metadata
    assert json.loads(meta[b"image_labeler.models"]) == ["cls", "tags", "sig"]
    assert meta[b"image_labeler.models.tags.task"] == b"zero-shot-image-classification"

    # --skip-existing: rows ok for every model are skipped; the failed ones run again.
    again = tmp_path / "again"
    assert (
        run_job(["--config", str(config), "--skip-existing", str(out), "--output", str(again)]) == 0
    )
    summary = json.loads((again / "__label_images__" / "summary.json").read_text())
    assert summary["rows_skipped"] == len(frame) - 2 and summary["rows_out"] == 2

    # A different model list reuses nothing.
    other = entries[:2]
    config2 = _write_config(tmp_path / "job2.yaml", manifest, other)
    third = tmp_path / "third"
    assert (
        run_job(["--config", str(config2), "--skip-existing", str(out), "--output", str(third)])
        == 0
    )
    summary = json.loads((third / "__label_images__" / "summary.json").read_text())
    assert summary["rows_skipped"] == 0


# ---- the graph: shared decoding, failures per model --------------------------------------


class _Counting:
    """A preprocessor that counts its images (in-process runner) and shares by key."""

    calls: dict[str, int] = {}

    def __init__(self, key: str, fail_on: str | None = None) -> None:
        self._key = key
        self._fail_on = fail_on

    def share_key(self) -> str:
        return self._key

    def setup(self) -> None:
        pass

    @property
    def draft_side(self) -> int:
        return 64

    def __call__(self, images: Any) -> list[np.ndarray]:
        _Counting.calls[self._key] = _Counting.calls.get(self._key, 0) + len(images)
        (image,) = images
        if self._fail_on and image.size == (7, 7):
            raise ValueError("cannot preprocess a 7x7 image")
        return [np.asarray(image, dtype=np.uint8)]


class _Handler(ModelHandler[Any, Any, Any]):
    """Labels an image by its width; fails on widths in `fail_widths`."""

    def __init__(self, tag: str, fail_widths: tuple[int, ...] = ()) -> None:
        self._tag = tag
        self._fail = fail_widths

    def load_model(self) -> Any:
        return None

    def run_inference(self, batch: Any, model: Any, inference_args: Any = None) -> Any:
        out = []
        for pixels in batch:
            if pixels.shape[1] in self._fail:
                raise RuntimeError(f"{self._tag} cannot label width {pixels.shape[1]}")
            out.append(Prediction([f"{self._tag}{pixels.shape[1]}"], [1.0]))
        return out


def _image_rows(tmp_path: Path) -> list[ImageRow]:
    from PIL import Image

    rows = []
    for i, side in enumerate((5, 6, 7, 8)):
        path = tmp_path / f"{side}.png"
        Image.new("RGB", (side, side), (i * 40, 0, 0)).save(path)
        rows.append(ImageRow(index=str(i), uri=str(path), values={"uri": str(path)}))
    rows.append(ImageRow(index="4", uri=str(tmp_path / "nope.png"), values={"uri": "nope"}))
    return rows


def test_each_image_is_decoded_once_and_each_distinct_preprocessing_runs_once(
    tmp_path: Path,
) -> None:
    _Counting.calls = {}
    _records.clear()
    steps = [
        ModelStep("a", _Handler("a"), _Counting("small")),
        ModelStep("b", _Handler("b"), _Counting("small")),
        ModelStep("c", _Handler("c"), _Counting("other")),
    ]
    fmt = RecordFormat(models=tuple(ModelColumns(s.name) for s in steps))
    label = LabelImageRows(steps=steps, options=LabelingOptions.of(LabelingSpec(), fmt))
    assert len(label.preprocessors) == 2
    with TestPipeline() as p:
        _ = p | beam.Create(_image_rows(tmp_path)) | label | beam.Map(_keep)
    assert _Counting.calls == {"small": 4, "other": 4}  # 4 decoded images, the 5th missing
    by_uri = {r["uri"]: r for r in _records}
    assert by_uri[str(tmp_path / "6.png")]["b_label"] == "b6"
    missing = by_uri["nope"]
    assert missing["status"] == missing["a_status"] == missing["c_status"] == "fetch_error"
    _records.clear()


_records: list[dict[str, Any]] = []


def _keep(record: dict[str, Any]) -> None:
    _records.append(record)  # the in-process runner: the test's own list


def test_a_model_that_fails_on_an_image_fails_only_its_own_columns(tmp_path: Path) -> None:
    _records.clear()
    steps = [
        ModelStep("a", _Handler("a", fail_widths=(6,)), _Counting("x")),
        ModelStep("b", _Handler("b"), _Counting("y", fail_on="7x7")),
        ModelStep("c", _Handler("c"), _Counting("x")),
    ]
    fmt = RecordFormat(models=tuple(ModelColumns(s.name) for s in steps))
    label = LabelImageRows(steps=steps, options=LabelingOptions.of(LabelingSpec(), fmt))
    with TestPipeline() as p:
        _ = p | beam.Create(_image_rows(tmp_path)) | label | beam.Map(_keep)
    by_uri = {Path(r["uri"]).name: r for r in _records}
    _records.clear()
    assert len(by_uri) == 5
    six = by_uri["6.png"]  # model a's forward fails on it: only a's columns
    assert six["a_status"] == "inference_error" and six["a_label"] is None
    assert six["b_label"] == "b6" and six["c_label"] == "c6"
    assert six["status"] == "inference_error"
    assert six["error"].startswith("inference_failed: a: ")
    seven = by_uri["7.png"]  # b's preprocessing fails on it
    assert seven["b_status"] == "decode_error" and seven["a_label"] == "a7"
    assert seven["error"].startswith("decode_failed: b: ")
    assert by_uri["8.png"]["status"] == "ok"


def test_the_record_format_of_several_models_round_trips_through_the_schema() -> None:
    import pyarrow as pa

    fmt = RecordFormat.for_input(
        pa.schema([("uri", pa.string()), ("status", pa.string())]),
        models=[ModelColumns("cls"), ModelColumns("tags", embeddings=True)],
    )
    schema = fmt.schema(pa.schema([("uri", pa.string()), ("status", pa.string())]), fmt.metadata)
    assert RecordFormat.of_schema(schema) == fmt
    assert fmt.name("status") == "label_status"  # the input's own status stays
    assert fmt.name("label", "cls") == "cls_label"
    assert "tags_embedding" in schema.names and "embedding" not in schema.names
    prefixed = RecordFormat(prefix="p_", models=(ModelColumns("cls"),))
    assert prefixed.names[-3:] == ("p_cls_error", "p_status", "p_error")


# ---- the options -----------------------------------------------------------------------


def _load(tmp_path: Path, data: dict[str, Any], *flags: str) -> Any:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"input": "in.txt", "output": "out", **data}))
    return load_config(["--config", str(path), *flags])[0]


def test_models_from_yaml_take_the_outer_options_as_defaults(tmp_path: Path) -> None:
    (tmp_path / "clip").mkdir()
    config = _load(
        tmp_path,
        {
            "top_k": 2,
            "fetch_timeout": 5,
            "models": [
                {"name": "cls"},
                {"name": "tags", "model": "clip", "candidate-labels": "a,b", "top_k": 7},
            ],
        },
    )
    cls, tags = config.model_specs
    assert (cls.name, cls.spec.model, cls.spec.top_k) == ("cls", "default", 2)
    assert tags.spec.model == str(tmp_path / "clip")  # relative to the YAML file
    assert (tags.spec.top_k, tags.spec.candidate_labels) == (7, ("a", "b"))
    assert cls.spec.fetch_timeout == tags.spec.fetch_timeout == 5.0
    assert config.labeling.fetch_timeout == 5.0


def test_models_on_the_command_line(tmp_path: Path) -> None:
    config, _ = load_config(
        [
            "--input=in.txt",
            "--output=out",
            "--models",
            "name=cls top_k=3",
            "--models",
            "name=tags model=org/clip candidate_labels='a cat,a dog' threshold=0.3",
        ]
    )
    cls, tags = config.model_specs
    assert cls.spec.top_k == 3
    assert tags.spec.candidate_labels == ("a cat", "a dog") and tags.spec.threshold == 0.3


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([{"name": "a"}, {"name": "a"}], "names must be distinct; ['a'] appear twice"),
        ([{"model": "default"}], "entry 0 needs a name"),
        ([{"name": "Bad-Name"}], "entry 0 needs a name"),
        ([{"name": "a", "top_k": -1}], "models[0] (a): --top-k (top_k): '-1' must be"),
        ([{"name": "a"}, {"name": "b", "fetch_timeout": 3}], "models[1] (b): fetch_timeout"),
        ([{"name": "a", "topk": 3}], "models[0] (a): unknown option 'topk'"),
        (
            [{"name": "a", "candidate_labels": "x,y"}],
            "models[0] (a): zero-shot classification (--candidate-labels) needs a CLIP",
        ),
        ("name=a top_k", "has 'top_k'; write each option as key=value"),
        ([], "must be a list of models"),
    ],
)
def test_model_list_mistakes_name_the_entry(tmp_path: Path, models: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, {"models": models})
    assert message in str(info.value)


def test_an_entry_replaces_the_outer_labels_however_either_gives_them() -> None:
    (spec,) = named_specs(
        {"model": "org/clip", "candidate_labels_file": "labels.txt"},
        [{"name": "a", "candidate_labels": "x,y"}],
    )
    assert spec.spec.candidate_labels == ("x", "y") and spec.spec.candidate_labels_file is None


def test_the_cli_exits_2_with_one_line_for_a_bad_entry(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    (tmp_path / "in.txt").write_text("a.jpg\n")
    result = run_cli(
        [
            "--input",
            str(tmp_path / "in.txt"),
            "--output",
            str(tmp_path / "out"),
            "--models",
            "name=a decode_threads=4",
        ],
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("label-images: error: models[0] (a): decode_threads")
    assert "Traceback" not in result.stderr


# ---- the consumers: Label Studio, the Python API, --resume --------------------------------


@pytest.mark.slow
def test_label_studio_export_takes_a_model_name(
    tmp_path: Path, manifest: Path, one_pass: OnePass
) -> None:
    from label_studio_sdk.label_interface import LabelInterface

    from pipelines import export

    out = one_pass.out
    vit, _, siglip = (e["model"] for e in one_pass.entries)
    root = str(manifest.anchor)
    assert export.main(["label-studio", str(out), "--to", str(tmp_path / "x")]) == 2
    for model, labels, choice in (
        ("cls", [f"class_{i}" for i in range(7)], "single"),
        ("sig", LABELS, "multiple"),
    ):
        to = tmp_path / f"ls-{model}"
        argv = ["label-studio", str(out), "--to", str(to), "--document-root", root]
        assert export.main([*argv, "--model", model]) == 0
        tasks = json.loads((to / "tasks.json").read_text())
        xml = (to / "config.xml").read_text()
        interface = LabelInterface(xml)
        assert sorted(interface.get_control("label").labels) == sorted(labels)
        assert f'choice="{choice}"' in xml
        assert len(tasks) == len(manifest.read_text().split()) - 2
        rows = _by_source(read_output(out))
        for task in tasks:
            assert interface.validate_task(cast(Any, {"data": task["data"]}))
            (prediction,) = task["predictions"]
            assert interface.validate_prediction(prediction, return_errors=True) == []
            row = rows[(task["data"]["source_file"], task["data"]["source_row"])]
            chosen = prediction["result"][0]["value"]["choices"]
            assert chosen == (
                row[f"{model}_labels"] if choice == "multiple" else [row["cls_label"]]
            )
            assert prediction["model_version"] == (vit if model == "cls" else siglip)


@pytest.mark.slow
def test_the_python_api_takes_the_same_model_list(
    tmp_path: Path, photo_dir: Path, tiny_vit: Path, tiny_clip: Path
) -> None:
    from transforms.api import LabelImages, classify

    entries = [
        {"name": "cls", "model": str(tiny_vit), "top_k": 2},
        {"name": "tags", "model": str(tiny_clip), "candidate_labels": LABELS},
    ]
    photos = [str(p) for p in sorted(photo_dir.glob("*.jpg"))]
    both = classify(photos, models=entries, device="cpu")
    assert [set(r) for r in both] == [{"cls", "tags"}] * len(photos)
    assert [r["cls"] for r in both] == classify(photos, model=str(tiny_vit), top_k=2, device="cpu")
    tags = classify(photos, model=str(tiny_clip), candidate_labels=LABELS, device="cpu")
    assert [r["tags"] for r in both] == tags
    with pytest.raises(ConfigError, match=r"models\[1\] \(tags\): unknown option 'top'"):
        classify(photos, models=[entries[0], {"name": "tags", "top": 1}])

    _records.clear()
    with TestPipeline() as p:
        _ = (
            p
            | beam.Create([{"id": i, "uri": u} for i, u in enumerate(photos)])
            | LabelImages(models=entries, device="cpu")
            | beam.Map(_keep)
        )
    by_id = {r["id"]: r for r in _records}
    _records.clear()
    for i, result in enumerate(both):
        record = by_id[i]
        assert record["status"] == "ok"
        assert record["cls_labels"] == [x["label"] for x in result["cls"]]
        np.testing.assert_allclose(
            record["tags_scores"], [x["score"] for x in result["tags"]], atol=1e-6
        )


@pytest.mark.slow
def test_resume_continues_a_several_model_run(
    tmp_path: Path, photo_dir: Path, tiny_vit: Path, tiny_clip: Path
) -> None:
    """An interrupted run (its first part committed, then killed) resumes with
    the same model list; a different list is refused."""
    from tests.conftest import kill_when_committed, start_cli

    photos = sorted(photo_dir.glob("*.jpg")) * 100
    manifest = tmp_path / "m.txt"
    manifest.write_text("\n".join(str(p) for p in photos) + "\n")
    entries: list[dict[str, Any]] = [
        {"name": "cls", "model": str(tiny_vit)},
        {"name": "tags", "model": str(tiny_clip), "candidate_labels": LABELS},
    ]
    config = _write_config(tmp_path / "job.yaml", manifest, entries)
    out = tmp_path / "out"
    args = ["--config", str(config), "--output", str(out), "--commit-every", "10"]
    kill_when_committed(out, 1, start_cli([*args, "--batch-size", "2"]))
    other = _write_config(tmp_path / "other.yaml", manifest, entries[:1])
    assert run_job(["--config", str(other), "--output", str(out), "--resume"]) == 2
    assert run_job([*args, "--resume"]) == 0
    table = read_output(out)
    keys = list(zip(table["source_file"].to_pylist(), table["source_row"].to_pylist(), strict=True))
    assert sorted(k[1] for k in keys) == list(range(len(photos)))  # each row exactly once
    summary = json.loads((out / "__label_images__" / "summary.json").read_text())
    assert summary["rows_resumed"] > 0
    assert summary["models"]["cls"]["images_by_status"]["ok"] == len(photos)
    assert summary["models"]["tags"]["images_by_status"]["ok"] == len(photos)


def test_the_readme_model_list_is_a_valid_config(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Several models in one pass", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "job.yaml").write_text(block)
    config, _ = load_config(["--config", str(tmp_path / "job.yaml")])
    cls, tags = config.model_specs
    assert (cls.name, cls.spec.model, cls.spec.top_k) == ("cls", "default", 5)
    assert (tags.name, tags.spec.threshold, tags.spec.top_k) == ("tags", 0.3, 0)
    assert tags.spec.embeddings and tags.spec.candidate_labels_file == "gs://bucket/tags.txt"
