"""Picking the runner: local runs use Beam's FnApiRunner directly, offline.

Beam's DirectRunner first tries the Prism runner, which downloads a binary
from the internet (and waits on the network where there is none) before it
falls back. With no `--runner`, or `--runner DirectRunner`, we build the same
FnApiRunner the DirectRunner would fall back to, so local runs never touch the
network. `--direct_num_workers` and `--direct_running_mode` work as usual;
when neither is given, local runs use two worker threads (see
`apply_local_defaults`). A Dataflow dry run's translated job is written out
by `write_dry_run_job`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineRunner

logger = logging.getLogger(__name__)

LOCAL_RUNNERS = {None, "", "directrunner", "direct", "fnapirunner"}


def is_local(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    return (name or "").lower() in LOCAL_RUNNERS


def in_process(options: PipelineOptions) -> bool:
    """Whether a local run executes the DoFns in this very process."""
    from apache_beam.options.pipeline_options import DirectOptions

    return options.view_as(DirectOptions).direct_running_mode != "multi_processing"


#: Local runs without --direct_num_workers/--direct_running_mode: two worker
#: threads sharing one model, so one bundle decodes while the other runs the
#: forward pass. MobileNetV2 on 2 cores: 38-40 -> 49-51 images/s at 400
#: images, 48 -> 70 at 4,000 (one worker: decoding and the forward pass take
#: turns). Threads, not processes: a process each would load its own model.
LOCAL_WORKERS = 2


def apply_local_defaults(options: PipelineOptions) -> None:
    """Two worker threads for a local run, unless the user chose otherwise."""
    from apache_beam.options.pipeline_options import DirectOptions

    names = ("direct_num_workers", "direct_running_mode")
    # A flag given with its default value (--direct_num_workers 1) counts too.
    flags = [str(flag).lstrip("-").split("=")[0] for flag in getattr(options, "_flags", [])]
    given = options.get_all_options(drop_default=True)
    if any(name in given or name in flags for name in names):
        return
    direct = options.view_as(DirectOptions)
    direct.direct_num_workers = LOCAL_WORKERS
    direct.direct_running_mode = "multi_threading"


def make_runner(options: PipelineOptions) -> PipelineRunner | None:
    """An offline local runner for local runs; None lets Beam pick (Dataflow ...)."""
    if not is_local(options):
        return None
    apply_local_defaults(options)
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    # As in DirectRunner.run_pipeline, so DoFns see the pipeline options.
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    provision_info = fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
    )
    return fn_runner.FnApiRunner(provision_info=provision_info)


def write_dry_run_job(result: Any, options: PipelineOptions) -> None:
    """On a Dataflow dry run, write the translated job to --dataflow_job_file.

    Beam's DataflowRunner returns before it writes that file on a dry run; we
    write the job description and the portable pipeline it would submit, so a
    dry run can be inspected (and tested) offline.
    """
    from apache_beam.options.pipeline_options import DebugOptions
    from google.protobuf import json_format

    path = options.view_as(DebugOptions).dataflow_job_file
    job = getattr(result, "job", None)
    if not path or job is None:
        return
    payload = {
        "job": json.loads(json_format.MessageToJson(job.proto._pb)),
        "pipeline": json_format.MessageToDict(job.proto_pipeline),
    }
    import fsspec

    with fsspec.open(path, "w") as f:
        f.write(json.dumps(payload, indent=1))
    logger.info("Dry run: wrote the translated job to %s", path)
