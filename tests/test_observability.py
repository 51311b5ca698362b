"""See the run: live progress, Beam counters, report.html (checked in headless
Chromium), join-back columns, column clashes, CLI basics."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.label_images import EXIT_BAD_CONFIG, EXIT_OK, report_main
from pipelines.output import REPORT_FILE
from pipelines.progress import Counts, ProgressPrinter, progress_line
from tests.conftest import read_output, run_cli, run_job
from transforms import __version__

REPO = Path(__file__).resolve().parents[1]


# ---- progress -------------------------------------------------------------------------


def test_progress_line_shows_failures_by_code_and_skipped_rows() -> None:
    counts = Counts(done=30, skipped=10, failed={"not_found": 2, "timeout": 1})
    line = progress_line(counts, total=100, elapsed=3.0)  # the rows to label, skipped ones out
    assert line.startswith("30/100 images (30%) · 10.0 images/s · ETA 7s")
    assert "skipped 10" in line and "failed: not_found 2, timeout 1" in line


def _count_file(folder: Path, name: str, data: dict[str, object]) -> None:
    (folder / f"{name}.count").write_text(json.dumps(data))


def test_plain_lines_off_a_terminal_and_redraws_on_one(tmp_path: Path) -> None:
    _count_file(tmp_path, "a", {"done": 3, "skipped": 0, "failed": {"not_found": 1}})
    _count_file(tmp_path, "b", {"done": 2, "skipped": 1, "failed": {"not_found": 1}})
    plain = io.StringIO()
    # 9 rows to label (the launcher leaves the skipped one out of the total).
    with ProgressPrinter(str(tmp_path), total=9, stream=plain, interval_s=0.05):
        time.sleep(0.3)
    lines = plain.getvalue().splitlines()
    assert lines and "5/9 images" in lines[0] and "failed: not_found 2" in lines[0]
    assert "skipped 1" in lines[0]
    assert len(set(lines)) == len(lines)  # a plain line only when something changed

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    with ProgressPrinter(str(tmp_path), total=10, stream=tty):
        time.sleep(1.2)
    assert tty.getvalue().count("\r\033[K") >= 3  # redrawn at least twice a second


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["multi_threading", "multi_processing"])
def test_progress_totals_in_both_runner_modes(
    mode: str, photo_dir: Path, tiny_vit: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.txt"
    photos = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    manifest.write_text("\n".join([*photos, "missing.jpg"]) + "\n")
    proc = run_cli(
        [
            "--input",
            str(manifest),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(tiny_vit),
            "--direct_num_workers",
            "2",
            "--direct_running_mode",
            mode,
        ]
    )
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    assert "5/5 images (100%)" in proc.stderr and "failed: not_found 1" in proc.stderr


@pytest.mark.slow
def test_beam_counters_for_dataflow(photo_dir: Path, tiny_vit: Path, tmp_path: Path) -> None:
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.config import load_config
    from pipelines.label_images import build, plan_job
    from pipelines.output import prepare_output
    from pipelines.runner import make_runner

    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{photo_dir / 'chelsea.jpg'}\n{photo_dir / 'coffee.jpg'}\nnope.jpg\n")
    config, _ = load_config(
        ["--input", str(manifest), "--output", str(tmp_path / "o"), "--model", str(tiny_vit)]
    )
    plan = plan_job(config)
    options = PipelineOptions([])
    pipeline = beam.Pipeline(runner=make_runner(options), options=options)
    build(
        pipeline,
        plan,
        output=prepare_output(config.output, overwrite=False),
        started_at=time.time(),
    )
    result = pipeline.run()
    result.wait_until_finish()
    # Summed over the steps that count (the UI shows the total): each row counts once.
    counters: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace("image_labeler"))["counters"]:
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + c.committed
    assert counters["images_ok"] == 2
    assert counters["images_failed"] == 1 and counters["images_failed_not_found"] == 1


# ---- report.html ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def labeled(photo_dir: Path, tiny_vit: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    lines = [
        *(p.name for p in sorted(photo_dir.glob("*.*"))),
        "missing.jpg",
        "https://user:pw@example.invalid/x.jpg?sig=SECRET",
    ]
    (root / "m.txt").write_text("\n".join(lines) + "\n")
    for path in photo_dir.iterdir():
        (root / path.name).write_bytes(path.read_bytes())
    out = root / "out"
    args = [
        "--input",
        str(root / "m.txt"),
        "--output",
        str(out),
        "--model",
        str(tiny_vit),
        "--allowed-schemes",
        "file",
    ]
    assert run_job(args) == EXIT_OK
    return out


def test_report_is_self_contained_and_rebuildable(
    labeled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = (labeled / REPORT_FILE).read_text()
    assert (labeled / REPORT_FILE).stat().st_size < 20 << 20
    for section in ("metadata", "labels", "scores", "examples", "low-confidence", "failures"):
        assert f'id="{section}"' in page
    assert "<link" not in page and "<script src" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert "not_found" in page and "unsupported_scheme" in page
    assert "SECRET" not in page and "user:pw" not in page  # sample URIs are redacted
    (labeled / REPORT_FILE).unlink()
    assert report_main([str(labeled)]) == EXIT_OK
    assert (labeled / REPORT_FILE).read_text().count('id="failures"') == 1
    assert report_main([str(labeled / "nothing")]) == EXIT_BAD_CONFIG


@pytest.mark.slow
def test_report_in_headless_chromium(labeled: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs Debian's chromium package; it is missing")
        pytest.skip("no chromium here (CI installs it)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--headless=new"]
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto((labeled / REPORT_FILE).as_uri())
        page.wait_for_load_state("load")
        assert page.locator("#labels svg rect").count() >= 1
        assert page.locator("#scores svg rect").count() == 20
        assert page.locator("#examples img").count() >= 2
        loaded = page.evaluate(
            "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
        )
        assert loaded
        assert page.locator("#failures td", has_text="not_found").count() == 1
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert shot.stat().st_size > 10_000


# ---- join-back columns, clashes, CLI basics ---------------------------------------------


def test_join_back_columns_and_prefix(
    photo_dir: Path, tiny_vit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.csv"
    photos = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    src.write_text("uri,label\n" + "\n".join(f"{p},human-{i}" for i, p in enumerate(photos)))
    base = ["--input", str(src), "--model", str(tiny_vit)]
    assert run_job([*base, "--output", str(tmp_path / "a")]) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "['label']" in err and "--output-prefix" in err
    assert run_job([*base, "--output", str(tmp_path / "b"), "--output-prefix", "pred_"]) == 0
    rows = read_output(tmp_path / "b").to_pylist()
    assert {"pred_label", "pred_score", "pred_source_row", "pred_status"} <= set(rows[0])
    for row in rows:  # the human labels are kept, and each row joins back by position
        assert row["label"] == f"human-{row['pred_source_row']}"
        assert row["uri"] == photos[row["pred_source_row"]]
        assert row["pred_source_file"] == str(src)


def test_parquet_rows_join_back(photo_dir: Path, tiny_vit: Path, tmp_path: Path) -> None:
    photos = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    for i in range(2):
        pq.write_table(
            pa.table({"uri": photos[i * 2 : i * 2 + 2], "n": [i * 2, i * 2 + 1]}),
            tmp_path / f"p{i}.parquet",
        )
    out = tmp_path / "out"
    assert (
        run_job(
            [
                "--input",
                str(tmp_path / "p*.parquet"),
                "--output",
                str(out),
                "--model",
                str(tiny_vit),
            ]
        )
        == 0
    )
    for row in read_output(out).to_pylist():
        source = pq.read_table(row["source_file"]).to_pylist()[row["source_row"]]
        assert source["uri"] == row["uri"] and source["n"] == row["n"]


def test_version_and_help_examples(capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.config import build_arg_parser

    parser = build_arg_parser()  # the parser `label-images` runs
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"label-images {__version__}"
    text = parser.format_help()
    assert "examples:" in text
    for example in (
        "--image-column image",
        "--candidate-labels",
        "DataflowRunner",
        "--resume",
        "photos.txt --output out/",
    ):
        assert example in text, example


@pytest.mark.slow
def test_progress_shows_skipped_rows_apart(photo_dir: Path, tiny_vit: Path, tmp_path: Path) -> None:
    photos = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    first = tmp_path / "first.txt"
    first.write_text("\n".join(photos[:2]) + "\n")
    common = ["--model", str(tiny_vit)]
    assert run_job(["--input", str(first), "--output", str(tmp_path / "a"), *common]) == 0
    manifest = tmp_path / "all.txt"
    manifest.write_text("\n".join(photos) + "\n")
    proc = run_cli(
        [
            "--input",
            str(manifest),
            "--output",
            str(tmp_path / "b"),
            *common,
            "--skip-existing",
            str(tmp_path / "a"),
        ]
    )
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    # Four rows in, two reused: two to label from the first line on, shown apart from
    # the two skipped.
    totals = set(re.findall(r"\d+/(\d+) images", proc.stderr))
    assert totals == {"2"}, proc.stderr
    assert "2/2 images (100%)" in proc.stderr and "skipped 2" in proc.stderr


def test_report_thumbnails_of_embedded_images(
    photo_dir: Path, tiny_vit: Path, tmp_path: Path
) -> None:
    """Images inside Parquet (not copied to the output) are read back from the input
    row by row group, so the report still shows them."""
    photos = sorted(photo_dir.glob("*.jpg"))
    src = tmp_path / "in.parquet"
    table = pa.table({"id": list(range(len(photos))), "image": [p.read_bytes() for p in photos]})
    pq.write_table(table, src, row_group_size=2)
    out = tmp_path / "out"
    assert run_job(["--input", str(src), "--output", str(out), "--model", str(tiny_vit)]) == 0
    page = (out / REPORT_FILE).read_text()
    examples = page.split('id="examples"', 1)[1].split('id="low-confidence"', 1)[0]
    assert examples.count('src="data:image/jpeg;base64,') >= len(photos)
    assert "no image" not in examples


@pytest.mark.slow
def test_report_thumbnails_follow_the_runs_fetch_settings(
    photo_dir: Path, tiny_vit: Path, tmp_path: Path
) -> None:
    """The report fetches thumbnails with the run's options: its allowed schemes and
    address guard govern those fetches too."""
    from pipelines.output import SUMMARY_FILE
    from tests.http_server import serve

    images = {p.name: p.read_bytes() for p in sorted(photo_dir.glob("*.jpg"))}
    with serve(images) as server:
        host, port = server.server_address[:2]
        manifest = tmp_path / "urls.txt"
        manifest.write_text("".join(f"http://{host!s}:{port}/img/{n}\n" for n in images))
        out = tmp_path / "out"
        assert (
            run_job(["--input", str(manifest), "--output", str(out), "--model", str(tiny_vit)]) == 0
        )
        page = (out / REPORT_FILE).read_text()
        assert page.count('src="data:image/jpeg;base64,') >= len(images)
        fetched = sum(server.hits.values())
        summary = json.loads((out / SUMMARY_FILE).read_text())
        summary["config"]["allowed_schemes"] = ["file"]  # as if run with --allowed-schemes file
        (out / SUMMARY_FILE).write_text(json.dumps(summary))
        assert report_main([str(out)]) == EXIT_OK
        assert sum(server.hits.values()) == fetched  # no thumbnail fetch left the allow-list
    assert 'src="data:image/jpeg;base64,' not in (out / REPORT_FILE).read_text()
