"""When the job started: the timing in summary.json counts the job's own process."""

from __future__ import annotations

import os
import time

import pipelines

#: The most time an interpreter takes from its start to its first import of
#: this package; a longer gap means the process was exec'd (`process_started_at`).
STARTUP_SLACK_S = 1.0


def process_started_at() -> float:
    """When this job's Python interpreter started: rates in summary.json count the
    start-up (imports, model check and load) too.

    The kernel's start time of the process (`/proc/self/stat`) survives exec,
    so for a job exec'd at the end of a shell chain (`python -m venv … && pip
    install … && python -m pipelines.demo`) or by a container entrypoint it is
    the shell's start. It is used only when it lies within `STARTUP_SLACK_S`
    before the first import of this package (an interpreter's own start-up
    takes tens of milliseconds); otherwise that import is the start.
    """
    imported = pipelines.IMPORTED_AT
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return imported
    kernel = time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
    return kernel if imported - kernel <= STARTUP_SLACK_S else imported
