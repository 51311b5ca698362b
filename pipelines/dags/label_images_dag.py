"""Nightly image labeling from Airflow, with `BeamRunPythonPipelineOperator`.

Two DAGs, one per runner:

- `label_images_local` runs the job on the local (DirectRunner) runner;
- `label_images_dataflow` runs it on Dataflow (`DataflowConfiguration`).

Both write to `<output root>/<ds>/` with `--overwrite`, so a retried or re-run
task for a logical date leaves exactly one set of Parquet files, and both push
the job's `summary.json` to XCom (task `read_summary`, key `return_value`).

The job runs with the project's own interpreter (`py_interpreter`), so the
Airflow environment and the labeling environment (torch, Beam) stay apart.
Configure with environment variables (or edit the defaults below):

    IMAGE_LABELER_PYTHON       interpreter of the labeling venv (has this project installed)
    IMAGE_LABELER_INPUT        manifest or Parquet to label
    IMAGE_LABELER_OUTPUT_ROOT  output root; one folder per logical date below it
    IMAGE_LABELER_MODEL        model (default: the offline default model)
    IMAGE_LABELER_GCP_PROJECT, IMAGE_LABELER_GCP_REGION, IMAGE_LABELER_TEMP_LOCATION
                               for the Dataflow DAG

Exit codes of the job (see the README): 0 ran; 1 failed; 2 bad config; 3 the
error rate passed --max-error-rate. Any non-zero code fails the task.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.sdk import DAG, task

PYTHON = os.environ.get("IMAGE_LABELER_PYTHON", "python3")
INPUT = os.environ.get("IMAGE_LABELER_INPUT", "demo/samples/manifest.txt")
OUTPUT_ROOT = os.environ.get("IMAGE_LABELER_OUTPUT_ROOT", "/tmp/image-labels")
MODEL = os.environ.get("IMAGE_LABELER_MODEL", "default")
OUTPUT = OUTPUT_ROOT.rstrip("/") + "/{{ ds }}"


def job_options(**extra: Any) -> dict[str, Any]:
    """label-images flags, as the Beam operator passes them (`--key=value`)."""
    return {
        "input": INPUT,
        "output": OUTPUT,
        "model": MODEL,
        "overwrite": True,  # idempotent per logical date
        "progress": "false",
        **extra,
    }


#: Where the job writes its summary in --output (`pipelines.output.SUMMARY_FILE`;
#: this file runs in Airflow's environment, without the project installed).
SUMMARY_FILE = "__label_images__/summary.json"


@task
def read_summary(output: str) -> dict[str, Any]:
    """The job's summary.json, returned to XCom."""
    try:
        import fsspec

        with fsspec.open(output.rstrip("/") + "/" + SUMMARY_FILE, "rt") as f:
            data: dict[str, Any] = json.load(f)
    except ImportError:  # plain local path without fsspec
        with open(output.rstrip("/") + "/" + SUMMARY_FILE) as f:
            data = json.load(f)
    return data


with DAG(
    dag_id="label_images_local",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["image-labeling"],
) as local_dag:
    label_local = BeamRunPythonPipelineOperator(
        task_id="label_images",
        runner="DirectRunner",
        py_file="pipelines.label_images",
        py_options=["-m"],  # run the installed package, as Dataflow's launcher does
        py_interpreter=PYTHON,
        pipeline_options=job_options(),
    )
    label_local >> read_summary(OUTPUT)


with DAG(
    dag_id="label_images_dataflow",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["image-labeling"],
) as dataflow_dag:
    from airflow.providers.google.cloud.operators.dataflow import DataflowConfiguration

    label_dataflow = BeamRunPythonPipelineOperator(
        task_id="label_images",
        runner="DataflowRunner",
        py_file="pipelines.label_images",
        py_options=["-m"],
        py_interpreter=PYTHON,
        pipeline_options=job_options(config="configs/dataflow-cpu.yaml"),
        dataflow_config=DataflowConfiguration(
            job_name="label-images-{{ ds_nodash }}",
            project_id=os.environ.get("IMAGE_LABELER_GCP_PROJECT", "my-project"),
            location=os.environ.get("IMAGE_LABELER_GCP_REGION", "us-central1"),
            wait_until_finished=True,
        ),
        default_pipeline_options={
            "temp_location": os.environ.get("IMAGE_LABELER_TEMP_LOCATION", "gs://bucket/tmp"),
        },
    )
    label_dataflow >> read_summary(OUTPUT)
