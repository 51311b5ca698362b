"""Bundle failures and retries, injected the way Dataflow meets them.

`RetryingRunner` is Beam's local FnApiRunner that gives every bundle a first
attempt whose outputs are dropped and whose failure is swallowed, then runs the
bundle again: what Dataflow does with a failed work item (up to 4 attempts,
maybe on another worker). The first attempt's side effects (part files it
committed) stay, as they do on Dataflow. It works in both local running modes:
the retry is decided on the runner side, the bundles run in threads or in
worker processes.

`FailingCommits` is the job's `WriteParts` with failures after a commit: the
first attempt of a bundle fails right after it committed a part, and with
`die_after` every attempt fails once that many parts were committed (the job
then fails, leaving parts of failed attempts behind, as a cancelled or crashed
Dataflow job does). It keeps its bookkeeping in files, so worker processes
share it.

This module is imported by worker processes (the DoFn is pickled by reference).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle

from pipelines.output import WriteParts


class InjectedFailure(RuntimeError):
    """The failure a test injects into a bundle."""


#: In the faults folder: which attempt of the running bundles this is.
ATTEMPT_FILE = "attempt"
FIRST, RETRY = "first", "retry"


class RetryingRunner(fn_runner.FnApiRunner):
    """Every bundle runs twice: an attempt whose outputs are dropped, then a retry.

    Stages run one at a time, so the attempt under way is one fact for all of a
    stage's bundles: it is written to `<faults>/attempt` for the DoFns to read.
    """

    def __init__(self, options: Any, faults: str | Path) -> None:
        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        super().__init__(
            provision_info=fn_runner.ExtendedProvisionInfo(
                beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
            )
        )
        self._attempt = Path(faults) / ATTEMPT_FILE
        # FnApiRunner replays bundles only when this is set (its profiling hook).
        self._bundle_repeat = 1

    def _run_bundle_multiple_times_for_testing(
        self,
        runner_execution_context: Any,
        bundle_manager: Any,
        data_input: Any,
        data_output: Any,
        fired_timers: Any,
        expected_output_timers: Any,
    ) -> None:
        runner_execution_context.state_servicer.checkpoint()
        self._attempt.write_text(FIRST)
        try:
            # dry_run: the attempt runs on the workers, its outputs are dropped.
            bundle_manager.process_bundle(
                data_input, data_output, fired_timers, expected_output_timers, dry_run=True
            )
        except Exception:  # the failed attempt; the runner retries the bundle
            pass
        finally:
            runner_execution_context.state_servicer.restore()
            self._attempt.write_text(RETRY)  # FnApiRunner runs the bundle next


def _claim(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class FailingCommits(WriteParts):
    """`WriteParts` whose first attempts fail right after committing a part.

    Args:
        faults: the `RetryingRunner`'s folder, also for the bookkeeping shared
            by all workers: `commit-*` (every part ever committed, orphans
            included), `failed-*` (attempts that failed).
        die_after: once this many parts were committed, every attempt fails
            after its commit (the job fails).
    """

    def __init__(self, *args: Any, faults: str, die_after: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._faults = faults
        self._die_after = die_after

    def _commit(self) -> str:
        name = super()._commit()
        faults = Path(self._faults)
        _claim(faults / f"commit-{name}")
        if self._die_after is not None and len(list(faults.glob("commit-*"))) >= self._die_after:
            raise InjectedFailure(f"injected: the job dies after committing {name}")
        if (faults / ATTEMPT_FILE).read_text() == FIRST:
            _claim(faults / f"failed-{name}")
            raise InjectedFailure(f"injected: the attempt fails after committing {name}")
        return name


def committed_ever(faults: str | Path) -> set[str]:
    """Every part file name any attempt committed."""
    return {p.name.removeprefix("commit-") for p in Path(faults).glob("commit-*")}
