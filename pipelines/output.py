"""The output directory: a folder that reads as one table, committed as the run goes.

Layout of a finished output::

    OUT/part-<run id>-<n>.parquet      the rows (the only files a reader sees)
    OUT/__label_images__/summary.json  counts, timing, the resolved config
    OUT/__label_images__/report.html   the report (`--report`)
    OUT/.label-images-run.json         only while a run is going (or interrupted)

Readers skip the folder of our own files by their own rules: Spark, Hadoop,
pyarrow, pandas and BigQuery's Hive layout skip names that start with `_` or
`.`, HF `datasets` skips dot files and folders that start with `__`, and
DuckDB's `OUT/**/*.parquet` matches part files only.

Commit protocol. A run owns an id. Its rows go into part files, each written to
a hidden temp name and renamed (on object stores, one upload that appears
whole), every `--commit-every` rows per worker, on time and at the end of each
bundle, so a run killed at 90% keeps 90%. A part's name reaches the finish only
through the output of a bundle that succeeded: a runner drops the outputs of a
failed attempt (Dataflow retries it, possibly on another worker), so the finish
keeps exactly the parts of successful attempts and removes every other part
file, including the orphans of failed attempts. `--resume` keeps one part per
committed row (`dedupe_parts`): a retried bundle's orphans hold rows that its
retry wrote again. When every row is written, summary.json is written
(atomically), then files that the run does not own (orphans, an earlier output
that `--overwrite` replaces) are removed, then the marker: the previous complete
output stays untouched until the new run commits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms.rows import RecordFormat

logger = logging.getLogger(__name__)

SHARD_PREFIX = "part"
SHARD_SUFFIX = ".parquet"
#: The folder of our files that are not rows: every reader's rules skip it (see above).
META_DIR = "__label_images__"
SUMMARY_FILE = f"{META_DIR}/summary.json"
REPORT_FILE = f"{META_DIR}/report.html"
#: Every label the model can give, in its order (`label-images export` reads it).
LABELS_FILE = f"{META_DIR}/labels.json"
#: Where summary.json and report.html lay before the output became a dataset:
#: still read (`label-images report`), and removed by `--overwrite`.
LEGACY_FILES = ("summary.json", "report.html")
RUN_MARKER = ".label-images-run.json"
#: A worker commits its part file at least this often (seconds), so a slow
#: job keeps its progress too.
COMMIT_INTERVAL_S = 60.0
#: A worker's first part is committed this soon after its first row, and the
#: interval grows 4x with each commit up to `COMMIT_INTERVAL_S` (0.25, 1, 4, 16,
#: 60 s): the first labels are on disk as soon as the first batch is labeled,
#: at the cost of four small early parts per worker.
FIRST_COMMIT_S = 0.25
COMMIT_GROWTH = 4.0


class OutputError(RuntimeError):
    """The output directory cannot be used as asked."""


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def _fs(directory: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(directory)
    return fs, path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _ours(name: str) -> bool:
    """Files and folders this tool writes at the top of an output directory."""
    temp_of = (f".{SHARD_PREFIX}-", f"{RUN_MARKER}.", *(f".{n}." for n in LEGACY_FILES))
    return (
        (name.startswith(SHARD_PREFIX + "-") and name.endswith(SHARD_SUFFIX))
        or name in (META_DIR, RUN_MARKER, *LEGACY_FILES)
        or name.startswith("beam-temp-")
        or (name.startswith(temp_of) and name.endswith(".tmp"))
    )


_umask_lock = threading.Lock()


def file_mode() -> int:
    """The mode `open()` gives a new file: 0666 less the umask (0644 under 022).

    `mkstemp` creates its files 0600 whatever the umask, which made every file
    of an output private to the writing user (an Airflow worker or a Spark job
    under another account could not read the labels).
    """
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # elsewhere: set and restore (other threads use it meanwhile)
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[Any], None]) -> None:
    """Write a file that appears under `path` only when complete.

    Locally: a hidden temp file beside it (with the umask's mode from the
    start), fsynced, then renamed over `path`. On object stores (gs://, s3://)
    an object appears only when its upload completes. A failed write (a full
    disk) raises and leaves nothing under `path`.
    """
    if not _is_local(fs):
        with fs.open(path, "wb") as f:
            write(f)
        return
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _listing(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The names in a folder (none if it is missing), fresh on object stores too."""
    try:
        # Object stores cache listings; this one must see the files just written.
        kwargs = {} if _is_local(fs) else {"refresh": True}
        listed = fs.ls(path, detail=False, **kwargs)
    except FileNotFoundError:
        return []
    names = [posixpath.basename(str(e).rstrip("/")) for e in listed]
    return [n for n in names if n and n != posixpath.basename(path.rstrip("/"))]


def list_ours(directory: str) -> list[str]:
    """Names of this tool's files and folders in `directory` (none if it is missing)."""
    fs, path = _fs(directory)
    return sorted(n for n in _listing(fs, path) if _ours(n))


def run_parts(directory: str, run_id: str) -> list[str]:
    """The committed part files of one run."""
    return [
        n
        for n in list_ours(directory)
        if n.startswith(f"{SHARD_PREFIX}-{run_id}-") and n.endswith(SHARD_SUFFIX)
    ]


@dataclass(frozen=True)
class OutputPlan:
    """Where this run writes: its id, and what an interrupted run already committed."""

    directory: str
    run_id: str
    resumed_files: tuple[str, ...] = ()  # part files of this run from before a --resume
    resumed_rows: int = 0


def _read_marker(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    marker = _join(path, RUN_MARKER)
    if not fs.exists(marker):
        return None
    try:
        with fs.open(marker, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _part_keys(
    fs: fsspec.AbstractFileSystem, path: str, columns: tuple[str, str], ids: dict[Any, int]
) -> np.ndarray:
    """The rows of one part file as int64 keys: source file id (`ids`) and source row."""
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=list(columns))
    if not table.num_rows:
        return np.empty(0, dtype=np.int64)
    files = table.column(0).fill_null("").combine_chunks().dictionary_encode()
    file_ids = np.array(
        [ids.setdefault(v, len(ids)) for v in files.dictionary.to_pylist()], dtype=np.int64
    )
    index = files.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    rows = table.column(1).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return (file_ids[index] << 40) + rows


def dedupe_parts(
    directory: str, names: Sequence[str], record_format: RecordFormat
) -> tuple[list[str], list[str], int]:
    """Which committed parts of an interrupted run to keep, so each row is kept once.

    A bundle that failed after committing a part, then ran again (Dataflow
    retries it, maybe on another worker), leaves that part beside the retry's,
    holding the same rows. Parts whose rows no other part holds are all kept;
    among the others, larger parts first, a part is kept when none of its rows
    is in a part already kept. The rows of a dropped part that no kept part
    holds are labeled again by the resumed run.

    Returns:
        (kept part names, dropped part names, rows in the kept parts)
    """
    fs, root = _fs(directory)
    columns = (record_format.name("source_file"), record_format.name("source_row"))
    ids: dict[Any, int] = {}
    keys = [_part_keys(fs, _join(root, name), columns, ids) for name in names]
    if not keys:
        return [], [], 0
    owner = np.concatenate([np.full(len(k), i, dtype=np.int64) for i, k in enumerate(keys)])
    flat = np.concatenate(keys)
    order = np.argsort(flat, kind="stable")
    flat, owner = flat[order], owner[order]
    repeated = np.zeros(len(flat), dtype=bool)
    same = flat[1:] == flat[:-1]
    repeated[1:] |= same
    repeated[:-1] |= same
    overlapping = set(np.unique(owner[repeated]).tolist())
    kept = [i for i in range(len(names)) if i not in overlapping]
    taken = np.empty(0, dtype=np.int64)
    for i in sorted(overlapping, key=lambda i: (-len(keys[i]), names[i])):
        if not np.isin(keys[i], taken).any():
            kept.append(i)
            taken = np.union1d(taken, keys[i])
    kept.sort()
    dropped = [names[i] for i in range(len(names)) if i not in set(kept)]
    return [names[i] for i in kept], dropped, int(sum(len(keys[i]) for i in kept))


def prepare_output(
    directory: str,
    *,
    overwrite: bool,
    resume: bool = False,
    identity: Mapping[str, str] | None = None,
    record_format: RecordFormat | None = None,
) -> OutputPlan:
    """Check the output directory and start (or continue) a run in it.

    Nothing of a finished output is deleted here: with `overwrite`, the
    previous output stays as it is until this run commits (`WriteSummary`
    removes it then). A `resume` removes the parts of failed attempts whose
    rows other parts hold (`dedupe_parts`).

    Raises:
        OutputError: a non-empty directory without `overwrite` or `resume`, or a
            `resume` that finds nothing to continue or a different job.
    """
    identity = dict(identity or {})
    fs, path = _fs(directory)
    if fs.exists(path) and not fs.isdir(path):
        raise OutputError(f"--output {directory} is a file, not a directory")
    fs.makedirs(path, exist_ok=True)
    try:
        listed = fs.ls(path, detail=False)
    except FileNotFoundError:  # an object store "directory" with no objects yet
        listed = []
    entries = [posixpath.basename(e.rstrip("/")) for e in listed]
    entries = [e for e in entries if e and e != posixpath.basename(path.rstrip("/"))]
    marker = _read_marker(fs, path)
    if resume:
        if marker is None:
            if summary_path(directory) is not None:
                raise OutputError(
                    f"--resume: --output {directory} holds a finished run ({SUMMARY_FILE}); "
                    "there is nothing to resume (use --overwrite to label again)"
                )
            if entries:
                raise OutputError(
                    f"--resume: --output {directory} holds no interrupted label-images run"
                )
        else:
            different = sorted(
                k for k in identity if marker.get("identity", {}).get(k) != identity[k]
            )
            if different:
                raise OutputError(
                    f"--resume: the run in --output {directory} was started with a different "
                    f"{', '.join(k.split('.')[-1] for k in different)}; resume it with the same "
                    "options, or use --overwrite"
                )
            run_id = str(marker["run_id"])
            kept, dropped, rows = dedupe_parts(
                directory, run_parts(directory, run_id), record_format or RecordFormat(source=True)
            )
            for name in dropped:
                fs.rm(_join(path, name))
            if dropped:
                logger.warning(
                    "--resume: removed %d part files of failed attempts (a retried bundle "
                    "committed their rows again)",
                    len(dropped),
                )
            logger.info("--resume: %d rows already committed in %d files", rows, len(kept))
            return OutputPlan(directory, run_id, tuple(kept), rows)
    elif entries and not overwrite:
        shown = ", ".join(sorted(entries)[:5]) + (" ..." if len(entries) > 5 else "")
        hint = (
            "pass --resume to continue the interrupted run in it, or --overwrite to start over"
            if marker is not None
            else "pass --overwrite to replace the previous output, or choose another directory"
        )
        raise OutputError(
            f"--output {directory} is not empty ({len(entries)} entries: {shown}); {hint}"
        )
    run_id = time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    payload = json.dumps({"run_id": run_id, "identity": identity, "started_at": time.time()})
    write_atomic(fs, _join(path, RUN_MARKER), lambda f: f.write(payload.encode("utf-8")))
    return OutputPlan(directory, run_id)


def shard_prefix(directory: str, run_id: str) -> str:
    return _join(directory, f"{SHARD_PREFIX}-{run_id}")


class WriteParts(beam.DoFn):
    """Writes records into Parquet part files, committing each as it fills.

    A part is committed every `rows_per_part` rows, at the end of a bundle, and
    on time: `FIRST_COMMIT_S` after the worker's first row, then at growing
    intervals up to every `commit_interval_s` seconds; its file name is emitted once it is
    complete under its final name. A failed write fails the bundle (and the
    job) and leaves no partial file under a final name.

    Example::

        names = records | beam.ParDo(WriteParts("out/", schema, run_id="r1"))
    """

    def __init__(
        self,
        directory: str,
        schema: pa.Schema,
        run_id: str,
        rows_per_part: int = 2000,
        commit_interval_s: float = COMMIT_INTERVAL_S,
    ) -> None:
        self._directory = directory
        self._schema = schema
        self._run_id = run_id
        self._rows_per_part = rows_per_part
        self._interval = commit_interval_s

    def setup(self) -> None:
        self._fs, self._root = _fs(self._directory)
        self._commits = 0

    def start_bundle(self) -> None:
        self._rows: list[dict[str, Any]] = []

    def _due(self) -> bool:
        interval = min(self._interval, FIRST_COMMIT_S * COMMIT_GROWTH**self._commits)
        return time.monotonic() - self._since >= interval

    def _commit(self) -> str:
        table = pa.Table.from_pylist(self._rows, schema=self._schema)
        self._rows = []
        self._since = time.monotonic()
        self._commits += 1
        name = f"{SHARD_PREFIX}-{self._run_id}-{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}"
        write_atomic(
            self._fs,
            _join(self._root, name),
            lambda f: pq.write_table(table, f, compression="snappy"),
        )
        return name

    def process(self, record: dict[str, Any]) -> Iterator[str]:
        if not self._rows:
            self._since = time.monotonic()  # the clock runs from a part's first row
        self._rows.append(record)
        if len(self._rows) >= self._rows_per_part or self._due():
            yield self._commit()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self._rows:
            yield WindowedValue(self._commit(), MIN_TIMESTAMP, (GlobalWindow(),))


def summary_path(directory: str) -> str | None:
    """The summary.json of a finished output (or of one written before 0.2), else None."""
    fs, path = _fs(directory)
    for name in (SUMMARY_FILE, LEGACY_FILES[0]):
        if fs.exists(_join(path, name)):
            return _join(directory, name)
    return None


def read_summary(directory: str) -> dict[str, Any]:
    """The summary of a finished output.

    Raises:
        FileNotFoundError: the directory holds no finished run.
    """
    found = summary_path(directory)
    if found is None:
        raise FileNotFoundError(_join(directory, SUMMARY_FILE))
    with fsspec.open(found, "r") as f:
        data: dict[str, Any] = json.load(f)
    return data
