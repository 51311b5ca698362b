"""Runs the example DAG with Airflow's `dag.test()` on SQLite (called by .ci/run).

Runs in a separate venv with apache-airflow 3.x and the beam + google
providers; the labeling job itself runs with the project's interpreter
(IMAGE_LABELER_PYTHON). Asserts the Parquet output and the summary in XCom,
then re-runs the same logical date and asserts exactly one set of files.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from datetime import datetime, timezone

output_root = os.environ["IMAGE_LABELER_OUTPUT_ROOT"]
logical_date = datetime(2026, 11, 20, tzinfo=timezone.utc)
ds = logical_date.strftime("%Y-%m-%d")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pipelines", "dags"))
import label_images_dag  # noqa: E402


def run_once() -> list[str]:
    dag_run = label_images_dag.local_dag.test(logical_date=logical_date)
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    print("task states:", states)
    assert all(state.endswith("success") for state in states.values()), states
    out = os.path.join(output_root, ds)
    shards = sorted(glob.glob(os.path.join(out, "part-*.parquet")))
    assert shards, f"no Parquet shards in {out}"
    with open(os.path.join(out, label_images_dag.SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert summary["rows_out"] == summary["rows_in"] > 0, summary
    assert summary["rows_by_status"]["ok"] > 0, summary
    xcom = [
        ti.xcom_pull(task_ids="read_summary")
        for ti in dag_run.get_task_instances()
        if ti.task_id == "read_summary"
    ][0]
    assert xcom and xcom["rows_out"] == summary["rows_out"], xcom
    names = sorted(os.listdir(out))
    # Exactly the files of this run: its committed parts, then the summary and the
    # report in the folder every reader skips.
    parts = [n for n in names if n.endswith(".parquet")]
    assert parts == sorted(summary["output_files"]), (names, summary["output_files"])
    assert sorted(set(names) - set(parts)) == ["__label_images__"], names
    meta = sorted(os.listdir(os.path.join(out, "__label_images__")))
    assert meta == ["labels.json", "report.html", "summary.json"], meta
    return names


first = run_once()
second = run_once()  # the same logical date again: --overwrite leaves one set
assert not set(first) & {n for n in second if n.endswith(".parquet")}, (first, second)
assert len(first) == len(second), (first, second)
print("airflow DAG test passed:", second)
