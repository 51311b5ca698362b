"""Tier 1: input planning, manifest parsing and config handling."""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.config import ConfigError, load_config
from transforms.errors import ErrorCode
from transforms.images.sources import InputError, count_rows, plan_input
from transforms.images.sources import manifest as manifest_reader
from transforms.images.sources.read import ReadImageRows, _ReadRows
from transforms.rows import RecordFormat
from transforms.uri import resolve_uri


def _read_all(plan) -> list:
    reader = _ReadRows(plan)
    rows = []
    for file_no, path in enumerate(plan.files):
        groups = 1
        if plan.format == "parquet":
            groups = pq.ParquetFile(path).metadata.num_row_groups
        for group in range(groups):
            rows += list(reader.process((file_no, path, group)))
    return rows


def test_text_manifest_skips_blanks_and_comments_and_resolves_relative(tmp_path: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text("# header\n\na.jpg\n  sub/b.png  \n/abs/c.jpg\ngs://bkt/d.jpg\na.jpg\n")
    plan = plan_input(str(manifest))
    assert plan.format == "text"
    assert plan.schema.names == ["uri"]
    rows = _read_all(plan)
    assert [r.uri for r in rows] == [
        str(tmp_path / "a.jpg"),
        str(tmp_path / "sub/b.png"),
        "/abs/c.jpg",
        "gs://bkt/d.jpg",
        str(tmp_path / "a.jpg"),
    ]
    assert [r.values["uri"] for r in rows][0] == "a.jpg"  # passthrough as written
    assert len({r.index for r in rows}) == 5  # duplicates keep distinct keys
    assert count_rows(plan) == 5


def test_csv_manifest_keeps_types_and_flags_malformed_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "image_url,id,weight,tag\n"
        'a.jpg,1,0.5,"x, quoted"\n'
        "b.jpg,2,,y\n"
        "c.jpg,not-a-number,1.5,z\n"
        "d.jpg,4\n"
    )
    # Types are inferred from the head of the file; make the head the first 2 rows
    # so a later row can disagree with them.
    monkeypatch.setattr(manifest_reader, "_INFER_BYTES", 50)
    plan = plan_input(str(manifest))
    assert plan.uri_column == "image_url"
    assert plan.schema.field("id").type == pa.int64()
    assert plan.schema.field("weight").type == pa.float64()
    rows = _read_all(plan)
    assert len(rows) == 4
    assert rows[0].values == {"image_url": "a.jpg", "id": 1, "weight": 0.5, "tag": "x, quoted"}
    assert rows[1].values["weight"] is None and rows[1].error is None
    assert rows[2].error is not None and rows[2].error.code is ErrorCode.MALFORMED_ROW
    assert "not-a-number" in str(rows[2].error)
    assert rows[3].error is not None and "2 fields" in str(rows[3].error)
    assert count_rows(plan) == 4


def test_jsonl_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"path": "a.jpg", "n": 1, "tags": ["x"]},
        {"path": "b.jpg", "n": None, "tags": []},
    ]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n[1]\n")
    plan = plan_input(str(manifest))
    assert plan.uri_column == "path"
    rows = _read_all(plan)
    assert [r.values.get("n") for r in rows[:2]] == [1, None]
    assert rows[0].values["tags"] == ["x"]
    assert rows[2].error is not None and rows[2].error.code is ErrorCode.MALFORMED_ROW
    assert rows[3].error is not None and "JSON object" in str(rows[3].error)


def test_parquet_row_groups_are_keyed_by_position(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    table = pa.table({"uri": [f"{i}.jpg" for i in range(10)], "n": list(range(10))})
    pq.write_table(table, path, row_group_size=3)
    plan = plan_input(str(path))
    rows = _read_all(plan)
    assert [r.values["n"] for r in rows] == list(range(10))
    assert [r.index for r in rows] == [f"0:{i}" for i in range(10)]
    assert count_rows(plan) == 10


@pytest.mark.parametrize(
    ("layout", "spread"),
    [("one manifest", False), ("two manifests", True), ("row groups", True)],
)
def test_the_read_spreads_units_only_when_there_are_several(
    tmp_path: Path, layout: str, spread: bool
) -> None:
    """Every row arrives exactly once; the units' reshuffle is there only when
    there is more than one unit to spread (a lone one costs a stage a run)."""
    if layout == "row groups":
        expected = [f"{i}.jpg" for i in range(10)]
        pq.write_table(pa.table({"uri": expected}), tmp_path / "in.parquet", row_group_size=3)
        pattern = str(tmp_path / "in.parquet")
    else:
        manifests = ("a", "b") if layout == "two manifests" else ("a",)
        expected = [f"{name}{i}.jpg" for name in manifests for i in range(5)]
        for name in manifests:
            (tmp_path / f"{name}.txt").write_text("".join(f"{name}{i}.jpg\n" for i in range(5)))
        pattern = str(tmp_path / "*.txt")
    plan = plan_input(pattern)
    with BeamTestPipeline() as pipeline:
        rows = pipeline | ReadImageRows(plan) | beam.Map(lambda r: r.uri.rsplit("/", 1)[-1])
        assert_that(rows, equal_to(expected))
    names = [t.unique_name for t in pipeline.to_runner_api().components.transforms.values()]
    assert any(name.endswith("/SpreadUnits") for name in names) is spread


def test_directory_of_parquet(tmp_path: Path) -> None:
    for i in range(2):
        pq.write_table(pa.table({"url": [f"{i}.jpg"]}), tmp_path / f"p{i}.parquet")
    plan = plan_input(str(tmp_path))
    assert len(plan.files) == 2 and plan.uri_column == "url"


def test_uri_column_errors(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"name": ["a"], "id": [1]}), path)
    with pytest.raises(InputError, match="no URI column"):
        plan_input(str(path))
    with pytest.raises(InputError, match="'missing' is not a column"):
        plan_input(str(path), uri_column="missing")
    with pytest.raises(InputError, match="expected strings"):
        plan_input(str(path), uri_column="id")


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        plan_input(str(tmp_path / "nope.txt"))
    with pytest.raises(InputError, match="matches no files"):
        plan_input(str(tmp_path / "*.csv"))


def test_image_files_as_the_input_are_refused_with_what_to_do(tmp_path: Path) -> None:
    from PIL import Image

    for name in ("a.jpg", "b.PNG", "c.webp"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    with pytest.raises(InputError, match=r"names image files \(a.jpg and 2 more\), not a manifest"):
        plan_input(str(tmp_path / "*.*"))
    with pytest.raises(InputError, match=r"\(b.PNG\).*--input photos.txt"):
        plan_input(str(tmp_path / "b.PNG"))
    (tmp_path / "photos.txt").write_text("a.jpg\nb.PNG\n")  # the manifest it asks for works
    assert plan_input(str(tmp_path / "photos.txt")).format == "text"


def test_resolve_uri() -> None:
    assert resolve_uri("a.jpg", "/data") == "/data/a.jpg"
    assert resolve_uri("../a.jpg", "/data/x") == "/data/a.jpg"
    assert resolve_uri("a.jpg", "gs://b/dir") == "gs://b/dir/a.jpg"
    assert resolve_uri("https://h/a.jpg", "/data") == "https://h/a.jpg"


def test_output_schema_refuses_clashing_columns() -> None:
    with pytest.raises(ValueError, match="label"):
        RecordFormat().schema(pa.schema([("uri", pa.string()), ("label", pa.int64())]))


def test_row_status_columns_step_aside_for_an_inputs_own() -> None:
    upstream = pa.schema([("url", pa.string()), ("status", pa.string())])  # img2dataset's
    fmt = RecordFormat.for_input(upstream, embeddings=False)
    assert [fmt.name(c) for c in ("status", "error", "label")] == [
        "label_status",
        "label_error",
        "label",
    ]
    schema = fmt.schema(upstream, fmt.metadata)
    assert schema.names[:2] == ["url", "status"] and "label_status" in schema.names
    assert RecordFormat.of_schema(schema) == fmt  # readers of the output find them again
    assert (
        RecordFormat.for_input(pa.schema([("uri", pa.string())]), embeddings=False).name("status")
        == "status"
    )
    prefixed = RecordFormat.for_input(upstream, prefix="pred_", embeddings=False)
    assert prefixed.name("status") == "pred_status" and not prefixed.status_prefix
    with pytest.raises(ValueError, match="--output-prefix"):  # a prediction column still asks
        both = pa.schema([("status", pa.string()), ("label", pa.string())])
        RecordFormat.for_input(both, embeddings=False).schema(both)


# ---- config --------------------------------------------------------------------


def test_flags_override_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("top-k: 3\nbatch_size: 4\npipeline_options:\n  direct_num_workers: 2\n")
    config, beam_args = load_config(
        ["--input", "in.txt", "--output", "out", "--config", str(cfg), "--top-k", "7"]
    )
    assert config.labeling.top_k == 7
    assert config.labeling.batch_size == 4
    assert beam_args == ["--direct_num_workers=2"]


def test_beam_options_pass_through() -> None:
    _, beam_args = load_config(
        ["--input", "i", "--output", "o", "--runner", "DirectRunner", "--direct_num_workers", "2"]
    )
    assert beam_args == ["--runner", "DirectRunner", "--direct_num_workers", "2"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input", "i", "--output", "o", "--top-k", "-1"], "--top-k"),
        (["--input", "i", "--output", "o", "--top-k", "many"], "--top-k"),
        (["--input", "i", "--output", "o", "--bogus-flag", "1"], "--bogus-flag"),
        (["--input", "i", "--output", "o", "--function-to-apply", "tanh"], "--function-to-apply"),
        (["--input", "i"], "--output is required"),
        (["--input", "i", "--output", "o", "--device", "cpu", "--precision", "fp16"], "fp16"),
        (["--input", "i", "--output", "o", "--batch-size", "4", "--min-batch-size", "8"], "min"),
    ],
)
def test_bad_flags(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_unknown_yaml_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: i\noutput: o\ntop_kk: 3\n")
    with pytest.raises(ConfigError, match="top_kk"):
        load_config(["--config", str(cfg)])


def test_candidate_labels_from_flag_and_yaml(tmp_path: Path) -> None:
    base = [
        "--input",
        "i",
        "--output",
        "o",
        "--task",
        "zero-shot-image-classification",
        "--model",
        "some/clip",
    ]
    config, _ = load_config(base + ["--candidate-labels", 'cat, "hot dog, grilled",car'])
    assert config.labeling.candidate_labels == ("cat", "hot dog, grilled", "car")
    assert config.labeling.hypothesis_template == ("This is a photo of {}.",)
    cfg = tmp_path / "zs.yaml"
    cfg.write_text(
        "task: zero-shot-image-classification\nmodel: some/clip\n"
        "candidate_labels: [cat, 'hot dog, grilled']\n"
        "hypothesis_template: ['a photo of {}.', 'art of {}.']\n"
    )
    config, _ = load_config(["--config", str(cfg), "--input", "i", "--output", "o"])
    assert config.labeling.candidate_labels == ("cat", "hot dog, grilled")
    assert config.labeling.hypothesis_template == ("a photo of {}.", "art of {}.")
    config, _ = load_config(
        ["--config", str(cfg), "--input", "i", "--output", "o", "--hypothesis-template", "{}"]
    )
    assert config.labeling.hypothesis_template == ("{}",)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "image-classification", "--candidate-labels", "cat"], "apply only to"),
        (["--candidate-labels", "cat"], "default model is an ImageNet classifier"),
        (["--hypothesis-template", "a {}"], "applies only to"),
        (
            [
                "--task",
                "zero-shot-image-classification",
                "--model",
                "m",
                "--candidate-labels",
                "a",
                "--candidate-labels-file",
                "f",
            ],
            "not both",
        ),
        (["--task", "zero-shot-image-classification", "--candidate-labels", "a"], "CLIP"),
    ],
)
def test_zero_shot_flag_conflicts(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(["--input", "i", "--output", "o", *argv])


def test_credentials_probe_fails_closed_saying_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from google.auth import _cloud_sdk

    from pipelines import preflight

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)

    def moved() -> str:
        raise AttributeError("no such helper in this google-auth")

    monkeypatch.setattr(_cloud_sdk, "get_application_default_credentials_path", moved)
    with caplog.at_level("WARNING", logger="pipelines.preflight"):
        assert preflight.has_gcs_credentials() is False
    assert "no such helper" in caplog.text and "--no_auth" in caplog.text
