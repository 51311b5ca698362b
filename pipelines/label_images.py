"""The `label-images` job: manifest or Parquet in, labeled Parquet out.

    ReadManifest ─► LabelImages (FetchAndDecode ─► RunInference) ─► WriteParquet
                                  └─► Summarize ─► __label_images__/summary.json

`plan_job` validates the config into a `JobPlan`, `prepare` readies the
output, `build` adds the graph to a pipeline and `finish` reports the run;
`run(argv)` parses flags, does all four and returns the exit code. The CLI (`label-images`,
`python -m pipelines.label_images`), Dataflow and Airflow all enter through `run`.

Exit codes: 0 the job ran (even if some images failed); 1 the job failed while
running; 2 bad configuration or input (nothing ran); 3 the share of failed rows
passed --max-error-rate.
"""

from __future__ import annotations

from pipelines import heap, logs

logs.hold()  # the imports below log through the root logger (see pipelines.logs)
_collector_was_on = heap.pause()  # they make ~1M lasting objects (see pipelines.heap)

import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from pipelines.clock import process_started_at
from pipelines.config import ConfigError, JobConfig, load_config
from pipelines.output import (
    OutputError,
    OutputPlan,
    WriteParts,
    prepare_output,
    read_summary,
    shard_prefix,
    summary_path,
)
from pipelines.preflight import check_output_overlap, preflight
from pipelines.progress import ProgressPrinter, ReportProgress
from pipelines.report import build_report
from pipelines.report import main as report_main
from pipelines.resume import (
    SKIPPED_TAG,
    PreviousOutput,
    ReadCommitted,
    ReadDoneUris,
    SkipCommitted,
    SkipDone,
    check_previous_output,
    count_skipped,
    run_identity,
)
from pipelines.runner import in_process, is_local, make_runner, write_dry_run_job
from pipelines.summary import SummarizeRecords, WriteSummary
from transforms.allocator import tune_malloc
from transforms.errors import redact, redact_uri
from transforms.images.sources import InputError, InputPlan, ReadImageRows, count_rows, plan_input
from transforms.label import LabelImageRows
from transforms.model.label_set import LabelSetError
from transforms.model.loading import ModelLoadError
from transforms.models import NamedSpec, model_columns
from transforms.resolve import model_labels, models_metadata, resolve_models
from transforms.rows import RecordFormat
from transforms.spec import LabelingSpec

if __name__ != "__main__":  # run as a program, `main` freezes what the import made
    heap.resume(_collector_was_on)

logs.release()

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_BAD_CONFIG = 2
EXIT_ERROR_RATE = 3


@dataclass(frozen=True)
class JobPlan:
    """A validated job: everything decided before anything runs, built once
    (`plan_job`) and read by the steps that prepare, build and finish it.

    Attributes:
        config: the parsed config.
        input: which files, which format, which columns.
        models: the resolved models (task, labels inline, device where
            known): one unnamed, or several named (`models:`).
        record_format: the output columns (prefix, status names, embeddings).
        metadata: the Parquet key-value metadata that describes the run.
        schema: the output schema, `metadata` included.
        skip_existing: the previous output whose ok rows are skipped.
        weights: the models loaded to check them (one per model), kept for an
            in-process run's handlers so each is read once (None otherwise).
    """

    config: JobConfig
    input: InputPlan
    models: tuple[NamedSpec, ...]
    record_format: RecordFormat
    metadata: dict[str, str]
    schema: pa.Schema
    skip_existing: PreviousOutput | None = None
    weights: list[Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def labeling(self) -> LabelingSpec:
        """The first model's resolved spec; its options of the whole pass
        (fetch, decode, device) are every model's."""
        return self.models[0].spec

    @property
    def several(self) -> bool:
        """Several named models (`models:`) rather than one."""
        return self.models[0].name is not None

    def effective(self) -> dict[str, Any]:
        """The settings that run, for summary.json: per model for several."""
        if not self.several:
            return self.labeling.effective()
        return {"models": {m.name: m.spec.effective() for m in self.models}}

    def labels(self) -> list[str] | dict[str, list[str]]:
        """Every label each model can give (`model_labels`)."""
        if not self.several:
            return model_labels(self.labeling)
        return {str(m.name): model_labels(m.spec) for m in self.models}


def plan_job(config: JobConfig, *, local: bool = True, keep_weights: bool = False) -> JobPlan:
    """Validate everything that can be checked before running, and plan the job.

    Args:
        config: the parsed config.
        local: the job runs on this machine (the device is resolved here).
        keep_weights: keep the model loaded to check its weights, for this
            process's handler (in-process local runs), so it loads once.

    Raises:
        ConfigError, InputError, ModelLoadError, ValueError: with a clear message.
    """
    inputs = plan_input(
        config.input,
        uri_column=config.uri_column,
        image_column=config.image_column,
        keep_image_column=config.keep_image_column,
        input_format=config.input_format,
        encoding=config.input_encoding,
        max_member_bytes=config.labeling.max_image_bytes,
    )
    check_output_overlap(config, inputs.files)
    resolved = resolve_models(config.model_specs, local=local)
    models = tuple(model for model, _ in resolved)
    fmt = RecordFormat.for_input(
        inputs.passthrough_schema,
        prefix=config.output_prefix,
        embeddings=models[0].spec.embeddings and models[0].name is None,
        models=model_columns(models),
    )
    described = {
        **models_metadata(models),
        **fmt.metadata,
        # Where the images came from, for the report's thumbnails.
        "image_labeler.uri_column": inputs.uri_column or "",
        "image_labeler.image_column": inputs.image_column or "",
    }
    skip = check_previous_output(config, inputs, described) if config.skip_existing else None
    return JobPlan(
        config=config,
        input=inputs,
        models=models,
        record_format=fmt,
        metadata=described,
        schema=fmt.schema(inputs.passthrough_schema, described),
        skip_existing=skip,
        weights=[weights for _, weights in resolved] if keep_weights else None,
    )


def prepare(plan: JobPlan, *, dry_run: bool) -> OutputPlan:
    """Check the output directory and start (or continue) this run in it.

    Raises:
        OutputError: see `prepare_output`.
    """
    config = plan.config
    if dry_run:
        return OutputPlan(config.output, "dry-run")
    return prepare_output(
        config.output,
        overwrite=config.overwrite,
        resume=config.resume,
        identity=run_identity(plan.metadata, redact_uri(config.input)),
        record_format=plan.record_format,
    )


def _read(pipeline: beam.Pipeline, plan: JobPlan, output: OutputPlan) -> _Rows:
    """The rows this run labels: the input, less the rows an interrupted run
    committed (`--resume`) and the rows a previous output holds (`--skip-existing`)."""
    fmt = plan.record_format
    rows = pipeline | "ReadManifest" >> ReadImageRows(plan.input)
    read = _Rows(rows, rows | "CountRows" >> _count())
    if output.resumed_files:
        committed = pipeline | "ReadCommitted" >> ReadCommitted(
            output.directory, output.resumed_files, fmt
        )
        keys = (
            committed
            | "CommittedKeys"
            >> beam.Map(lambda r: (r[fmt.name("source_file")], r[fmt.name("source_row")]))
            | "CommittedSet" >> beam.CombineGlobally(beam.combiners.ToSetCombineFn())
        )
        read.rows = read.rows | "SkipCommitted" >> beam.ParDo(
            SkipCommitted(), committed=beam.pvalue.AsSingleton(keys)
        )
        read.resumed_stats = committed | "SummarizeCommitted" >> beam.CombineGlobally(
            SummarizeRecords(fmt)
        )
    if plan.skip_existing:
        uri_column = plan.input.uri_column or ""
        done = pipeline | "ReadPreviousOutput" >> ReadDoneUris(plan.skip_existing, uri_column)
        split = read.rows | "SkipExisting" >> beam.ParDo(
            SkipDone(uri_column), done=beam.pvalue.AsSingleton(done)
        ).with_outputs(SKIPPED_TAG, main="rows")
        read.rows = split.rows
        read.skipped = split[SKIPPED_TAG]
    return read


def _count() -> beam.PTransform:
    """Count.Globally without the step that makes its 0 for an empty input:
    the side input that reads the count has that default itself. On a local run
    every step of the graph is a stage of its own after the labeling, so each
    one saved comes off the end of the run."""
    return beam.CombineGlobally(beam.combiners.CountCombineFn()).without_defaults()


@dataclass
class _Rows:
    """The PCollections `_read` hands on: the rows to label and what was counted."""

    rows: beam.PCollection
    rows_in: beam.PCollection
    resumed_stats: beam.PCollection | None = None
    skipped: beam.PCollection | None = None


def _write(plan: JobPlan, records: beam.PCollection, output: OutputPlan) -> beam.PCollection:
    """Commit the records as part files; the written files' names."""
    config = plan.config
    if config.num_shards:
        # A fixed number of files: Beam's sink, which commits them all at the end.
        return records | "WriteParquet" >> beam.io.WriteToParquet(
            shard_prefix(output.directory, output.run_id),
            schema=plan.schema,
            file_name_suffix=".parquet",
            num_shards=config.num_shards,
            codec="snappy",
        )
    return records | "WriteParquet" >> beam.ParDo(
        WriteParts(output.directory, plan.schema, output.run_id, config.commit_every)
    )


def build(
    pipeline: beam.Pipeline,
    plan: JobPlan,
    *,
    output: OutputPlan,
    started_at: float,
    progress_dir: str | None = None,
    preload: bool = False,
) -> beam.PCollection:
    """Add the job's graph to `pipeline`. Returns the PCollection of output records.

    With `preload`, the model starts loading in this process right away (for
    in-process runners: it then loads while Beam plans and reads).
    """
    fmt = plan.record_format
    read = _read(pipeline, plan, output)
    label = LabelImageRows.of_models(plan.models, fmt)
    if preload:
        label.preload(plan.weights)
    records = read.rows | "LabelImages" >> label
    written = _write(plan, records, output)
    summarize = SummarizeRecords(fmt)
    side_inputs: dict[str, Any] = {
        "files": beam.pvalue.AsList(written),
        "stats": beam.pvalue.AsSingleton(
            records | "Summarize" >> beam.CombineGlobally(summarize).without_defaults(),
            default_value=summarize.apply([]),  # what CombineGlobally's default step made
        ),
        "rows_in": beam.pvalue.AsSingleton(read.rows_in, default_value=0),
    }
    if read.skipped is not None:  # else WriteSummary's default, 0
        side_inputs["rows_skipped"] = beam.pvalue.AsSingleton(
            read.skipped | "CountSkipped" >> _count(), default_value=0
        )
    if read.resumed_stats is not None:
        side_inputs["resumed_stats"] = beam.pvalue.AsSingleton(read.resumed_stats)
    _ = (
        pipeline
        | "SummaryTrigger" >> beam.Create([None])
        | "WriteSummary"
        >> beam.ParDo(
            WriteSummary(
                output,
                started_at,
                {**plan.config.to_dict(), "effective": plan.effective()},
                steady_from=time.time(),
                labels=plan.labels(),
            ),
            **side_inputs,
        )
    )
    if progress_dir:
        _ = records | "ReportProgress" >> beam.ParDo(ReportProgress(progress_dir, fmt))
        if read.skipped is not None:
            _ = read.skipped | "ReportSkipped" >> beam.ParDo(
                ReportProgress(progress_dir, kind="skipped")
            )
    return records


def _print_summary(summary: dict[str, Any]) -> None:
    statuses = ", ".join(f"{k} {v}" for k, v in summary["rows_by_status"].items() if v)
    print(
        f"Labeled {summary['rows_out']} of {summary['rows_in']} rows ({statuses or 'none'}) "
        f"in {summary['wall_time_s']:.1f}s, {summary['images_per_s']:.1f} images/s",
        file=sys.stderr,
    )
    if summary["top_labels"]:
        top = ", ".join(f"{t['label']} ({t['count']})" for t in summary["top_labels"][:5])
        print(f"Top labels: {top}", file=sys.stderr)
    for name, section in summary.get("models", {}).items():
        ok = section["images_by_status"].get("ok", 0)
        top = ", ".join(f"{t['label']} ({t['count']})" for t in section["top_labels"][:5])
        print(f"  {name}: {ok} ok; top labels: {top or 'none'}", file=sys.stderr)
    if summary["errors_by_code"]:
        errors = ", ".join(f"{k} {v}" for k, v in summary["errors_by_code"].items())
        print(f"Errors: {errors}", file=sys.stderr)
    print(f"Output: {summary['config']['output']}", file=sys.stderr)


def _progress_total(plan: JobPlan, output: OutputPlan) -> int | None:
    """The rows this run labels, for the progress line: without resumed or
    skipped ones; None when that is not cheap to know."""
    total = count_rows(plan.input)
    if total is None:
        return None
    skipped = count_skipped(plan.input, plan.skip_existing) if plan.skip_existing else 0
    return None if skipped is None else max(total - output.resumed_rows - skipped, 0)


def _execute(
    pipeline: beam.Pipeline,
    plan: JobPlan,
    output: OutputPlan,
    options: PipelineOptions,
    *,
    started_at: float,
    local: bool,
    dry_run: bool,
    freeze_heap: bool = False,
) -> None:
    """Build the graph on `pipeline` and run it to the end, with the progress
    line on a local run (with `freeze_heap`, start-up's objects frozen first:
    `pipelines.heap`). Raises what the run raised."""
    show_progress = local and plan.config.progress
    with tempfile.TemporaryDirectory(prefix="label-images-progress-") as progress_dir:
        build(
            pipeline,
            plan,
            output=output,
            started_at=started_at,
            progress_dir=progress_dir if show_progress else None,
            preload=local and in_process(options),
        )
        if freeze_heap:
            heap.freeze()
        if show_progress:
            with ProgressPrinter(progress_dir, _progress_total(plan, output)) as printer:
                pipeline.run().wait_until_finish()
            print(printer.line(), file=sys.stderr)
            return
        result = pipeline.run()
        result.wait_until_finish()
        if dry_run:
            write_dry_run_job(result, options)


def finish(config: JobConfig) -> int:
    """After a run: print its summary, write the report; the exit code."""
    try:
        summary = read_summary(config.output)
    except FileNotFoundError:
        print("label-images: the job ran but wrote no summary.json", file=sys.stderr)
        return EXIT_JOB_FAILED
    _print_summary(summary)
    print(f"Summary: {summary_path(config.output)}", file=sys.stderr)
    if config.report:
        try:
            print(f"Report: {build_report(config.output)}", file=sys.stderr)
        except Exception as e:  # the labels are written; a report problem is no failure
            logger.warning("Could not write report.html: %s", redact(f"{type(e).__name__}: {e}"))
    # The final line is one machine-readable JSON summary (scheduler logs).
    brief = {k: v for k, v in summary.items() if k != "config"}
    print(json.dumps({"label_images_summary": brief}, default=str))
    if config.max_error_rate is not None and summary["error_rate"] > config.max_error_rate:
        print(
            f"label-images: error rate {summary['error_rate']:.3f} is above "
            f"--max-error-rate {config.max_error_rate}",
            file=sys.stderr,
        )
        return EXIT_ERROR_RATE
    return EXIT_OK


def run(
    argv: Sequence[str] | None = None,
    save_main_session: bool = True,
    test_pipeline: beam.Pipeline | None = None,
    started_at: float | None = None,
    freeze_heap: bool = False,
) -> int:
    """Parse flags, run the job and return its exit code: plan, prepare, build
    and run, finish.

    Args:
        argv: the flags (default: `sys.argv[1:]`).
        save_main_session: Beam's option of that name.
        test_pipeline: run on this pipeline instead of building one.
        started_at: when the job started, for summary.json's timing (default:
            this call). Entry points pass `process_started_at()`, so a CLI run
            counts its interpreter's start-up as well.
        freeze_heap: freeze what start-up made just before the pipeline runs
            (`pipelines.heap`); entry points that own their process pass True.
    """
    called_at = time.time()
    logs.setup()  # quiet until the flags say otherwise
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, beam_args = load_config(argv)
        logs.setup(verbose=config.verbose)
        options = PipelineOptions(beam_args)
        # Beam's --dry_run takes a value (--dry_run=True) and keeps it a string.
        dry_run = str(options.get_all_options().get("dry_run")).lower() in ("true", "1", "yes")
        preflight(config, options)
        runs_here = is_local(options)
        local = runs_here and test_pipeline is None
        shared = any(
            m.spec.share_model_across_processes or m.spec.model_copies for m in config.model_specs
        )
        plan = plan_job(
            config, local=runs_here, keep_weights=local and in_process(options) and not shared
        )
        output = prepare(plan, dry_run=dry_run)
    except (ConfigError, InputError, LabelSetError, ModelLoadError, OutputError, ValueError) as e:
        # One line, no traceback: the message names the flag or value to change.
        print(f"label-images: error: {redact(' '.join(str(e).split()))}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    options.view_as(SetupOptions).save_main_session = save_main_session
    if config.labeling.tune_malloc:
        tune_malloc()  # the launcher is the worker of an in-process run
    pipeline = test_pipeline or beam.Pipeline(runner=make_runner(options), options=options)
    try:
        _execute(
            pipeline,
            plan,
            output,
            options,
            started_at=called_at if started_at is None else started_at,
            local=local,
            dry_run=dry_run,
            freeze_heap=freeze_heap,
        )
    except Exception as e:
        logger.exception("The labeling job failed")
        print(f"label-images: job failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_JOB_FAILED
    if dry_run:
        print(
            "label-images: dry run: the job graph was built and translated, not run",
            file=sys.stderr,
        )
        print(json.dumps({"label_images_dry_run": True}))
        return EXIT_OK
    return finish(config)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] in (["report"], ["export"]):
        heap.freeze()  # the collector on again for the subcommand, past start-up's objects
    if argv[:1] == ["report"]:
        sys.exit(report_main(argv[1:]))
    if argv[:1] == ["export"]:
        from pipelines import export

        sys.exit(export.main(argv[1:]))
    heap.pause()  # until the pipeline runs (see pipelines.heap)
    code = run(argv, started_at=process_started_at(), freeze_heap=True)
    heap.freeze()  # the interpreter's last collection skips it all
    sys.exit(code)


if __name__ == "__main__":
    main()
