"""Hostile manifests and files: no crash, no hang, bounded memory, one row per input row.

Tier 1 checks each reader and the local fetch path on its own (with property
tests over random bytes), tier 4 runs one mixed manifest of every case through
the job.
"""

from __future__ import annotations

import codecs
import concurrent.futures
import csv
import gzip
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.label_images import EXIT_BAD_CONFIG, EXIT_OK
from pipelines.output import SUMMARY_FILE
from tests.conftest import default_fetch, read_output, real_photo, run_job
from transforms.errors import ErrorCode, RowError
from transforms.images.decode import decode_image
from transforms.images.fetch import fetch_bytes
from transforms.images.sources import InputError, InputPlan, count_rows, plan_input
from transforms.images.sources import manifest as manifest_reader
from transforms.images.sources.read import _ReadRows

REPO = Path(__file__).resolve().parents[1]


def _rows(plan: InputPlan) -> list[Any]:
    reader = _ReadRows(plan)
    out = []
    for file_no, path in enumerate(plan.files):
        groups = pq.ParquetFile(path).metadata.num_row_groups if plan.format == "parquet" else 1
        for group in range(groups):
            out += list(reader.process((file_no, path, group)))
    return out


def _codes(rows: list[Any]) -> list[str | None]:
    return [r.error.code.value if r.error else None for r in rows]


# ---- manifest readers ----------------------------------------------------------------


def test_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(codecs.BOM_UTF8 + b"uri,id\na.jpg,1\nb.jpg,2\n")
    plan = plan_input(str(path))
    assert plan.uri_column == "uri"
    rows = _rows(plan)
    assert [r.values["uri"] for r in rows] == ["a.jpg", "b.jpg"]
    assert _codes(rows) == [None, None]


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl"])
def test_undecodable_bytes_fail_their_line_only(fmt: str, tmp_path: Path) -> None:
    lines = {
        "txt": [b"a.jpg", b"caf\xe9.jpg", b"c.jpg"],
        "csv": [b"uri,n", b"a.jpg,1", b"caf\xe9.jpg,2", b"c.jpg,3"],
        "jsonl": [b'{"uri": "a.jpg"}', b'{"uri": "caf\xe9.jpg"}', b'{"uri": "c.jpg"}'],
    }[fmt]
    path = tmp_path / f"m.{fmt}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = _rows(plan_input(str(path)))
    assert _codes(rows) == [None, "bad_encoding", None]
    bad_line = 3 if fmt == "csv" else 2
    assert f"line {bad_line}:" in str(rows[1].error)
    assert "caf" not in str(rows[1].error)  # no contents in messages
    latin = _rows(plan_input(str(path), encoding="latin-1"))
    assert _codes(latin) == [None, None, None]
    assert latin[1].uri is not None and latin[1].uri.endswith("café.jpg")


def test_a_csv_field_of_any_size(tmp_path: Path) -> None:
    big = "x" * (300 << 10)  # 300 KiB, past csv's 128 KiB default limit
    path = tmp_path / "m.csv"
    path.write_text(f'uri,note\na.jpg,"{big}"\nb.jpg,short\n')
    rows = _rows(plan_input(str(path)))
    assert _codes(rows) == [None, None]
    assert rows[0].values["note"] == big


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl"])
def test_a_line_past_the_limit_is_an_error_row(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest_reader, "MAX_LINE_BYTES", 1000)
    long = "y" * 5000
    body = {
        "txt": f"a.jpg\n{long}.jpg\nc.jpg\n",
        "csv": f"uri\na.jpg\n{long}.jpg\nc.jpg\n",
        "jsonl": f'{{"uri": "a.jpg"}}\n{{"uri": "{long}"}}\n{{"uri": "c.jpg"}}\n',
    }[fmt]
    path = tmp_path / f"m.{fmt}"
    path.write_text(body)
    rows = _rows(plan_input(str(path)))
    assert _codes(rows) == [None, "line_too_long", None]
    assert rows[2].values["uri"] == "c.jpg"


def test_jsonl_bad_lines_fail_alone(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    lines = [
        '{"uri": "a.jpg", "n": 1}',
        '{"uri": "b.jpg", "n": "two"}',  # wrong type, inside the inference sample
        "{not json",
        '{"uri": "d.jpg", "n": 4, "extra": true}',  # a key no other line has... later
        "[1, 2]",
        '{"uri": "f.jpg", "n": null}',
    ]
    path.write_text("\n".join(lines) + "\n")
    monkeypatch_head = len(lines[0]) + len(lines[1]) + 2  # the sample: two lines
    plan = plan_input(str(path))  # the whole file as sample: never refused
    assert plan.schema.field("n").type == pa.int64()
    rows = _rows(plan)
    assert len(rows) == 6
    codes = _codes(rows)
    assert codes[0] is None and codes[5] is None
    assert codes[1] == codes[2] == codes[4] == "malformed_row"
    assert "'two'" in str(rows[1].error) and "line 2" in str(rows[1].error)
    assert monkeypatch_head > 0


def test_jsonl_unknown_keys_are_error_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"uri": "a.jpg"}\n{"uri": "b.jpg"}\n{"uri": "c.jpg", "surprise": 1}\n')
    monkeypatch.setattr(manifest_reader, "_INFER_BYTES", 40)  # the sample misses line 3
    rows = _rows(plan_input(str(path)))
    assert _codes(rows) == [None, None, "malformed_row"]
    assert "unknown key" in str(rows[2].error) and "surprise" in str(rows[2].error)


def test_duplicate_csv_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("uri,id,id\na.jpg,1,2\n")
    with pytest.raises(InputError, match="'id' twice"):
        plan_input(str(path))


def test_parquet_schemas_are_unified(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"uri": ["a.jpg"], "n": pa.array([1], pa.int32())}), tmp_path / "p0.parquet"
    )
    pq.write_table(
        pa.table({"uri": ["b.jpg"], "n": pa.array([2], pa.int64()), "tag": ["x"]}),
        tmp_path / "p1.parquet",
    )
    plan = plan_input(str(tmp_path))
    assert plan.schema.field("n").type == pa.int64()
    rows = _rows(plan)
    assert [r.values for r in rows] == [
        {"uri": "a.jpg", "n": 1, "tag": None},
        {"uri": "b.jpg", "n": 2, "tag": "x"},
    ]


def test_parquet_schemas_that_cannot_be_unified_name_file_and_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"uri": ["a.jpg"], "n": [1]}), tmp_path / "p0.parquet")
    pq.write_table(pa.table({"uri": ["b.jpg"], "n": [[1, 2]]}), tmp_path / "p1.parquet")
    with pytest.raises(InputError, match=r"p1\.parquet column 'n'"):
        plan_input(str(tmp_path))


# ---- property tests: no exception ever leaves a reader ---------------------------------


def _expected_text_rows(data: bytes) -> int:
    pieces = data.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()
    count = 0
    for i, raw in enumerate(pieces):
        if i == 0 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[3:]
        try:
            text = (raw + b"\n").decode("utf-8").strip()
        except UnicodeDecodeError:
            count += 1
            continue
        if text and not text.startswith("#"):
            count += 1
    return count


_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_LINES = st.lists(
    st.one_of(
        st.binary(max_size=80),
        st.text(max_size=60).map(lambda t: t.encode("utf-8")),
        st.text(max_size=40).map(lambda t: t.encode("utf-16", errors="ignore")),
        st.sampled_from([b"", b"#c", b'"', b"a,b", b"\xef\xbb\xbf", b"\r", b"{}", b"\x00"]),
    ),
    max_size=25,
)


@_SETTINGS
@given(lines=_LINES, compress=st.booleans())
def test_text_reader_never_raises_and_keeps_every_line(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], compress: bool
) -> None:
    data = b"\n".join(line.replace(b"\n", b" ") for line in lines)
    path = tmp_path_factory.mktemp("prop") / ("m.txt.gz" if compress else "m.txt")
    path.write_bytes(gzip.compress(data) if compress else data)
    plan = plan_input(str(path))
    rows = _rows(plan)
    assert len(rows) == _expected_text_rows(data) == count_rows(plan)


@_SETTINGS
@given(lines=_LINES)
def test_jsonl_reader_never_raises(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes]
) -> None:
    good = b'{"uri": "a.jpg", "n": 1}'
    data = b"\n".join([good, *(line.replace(b"\n", b" ") for line in lines)]) + b"\n"
    path = tmp_path_factory.mktemp("prop") / "m.jsonl"
    path.write_bytes(data)
    rows = _rows(plan_input(str(path)))
    non_blank = 0
    for raw in data.split(b"\n")[:-1]:
        try:
            non_blank += bool(raw.decode("utf-8").strip())
        except UnicodeDecodeError:
            non_blank += 1
    assert len(rows) == non_blank
    assert rows[0].error is None


_CELL = st.one_of(
    st.text(max_size=30),
    st.sampled_from(['a,"b"', "line\nbreak", '"', "", "x" * 200, "é ü 猫"]),
)


@_SETTINGS
@given(
    records=st.lists(st.lists(_CELL, min_size=1, max_size=5), max_size=20),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "cp1252"]),
    delimiter=st.sampled_from([",", "\t"]),
)
def test_csv_reader_keeps_every_record(
    tmp_path_factory: pytest.TempPathFactory,
    records: list[list[str]],
    encoding: str,
    delimiter: str,
) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter)  # \r\n: fields holding \r get quoted
    writer.writerow(["uri", "a", "b", "c", "d"])
    for record in records:
        writer.writerow(record)
    data = buf.getvalue().encode(encoding, errors="replace")
    path = tmp_path_factory.mktemp("prop") / ("m.tsv" if delimiter == "\t" else "m.csv")
    path.write_bytes(data)
    plan = plan_input(str(path), encoding="utf-8")
    rows = _rows(plan)
    # csv.writer quotes a lone empty field (""), so no record is a blank line.
    assert len(rows) == len(records)
    for row in rows:
        assert row.error is None or row.error.code in (
            ErrorCode.BAD_ENCODING,
            ErrorCode.MALFORMED_ROW,
        )


@_SETTINGS
@given(data=st.binary(max_size=400))
def test_csv_reader_survives_random_bytes(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("prop") / "m.csv"
    path.write_bytes(b"uri,x\n" + data)
    try:
        plan = plan_input(str(path))
    except InputError:
        return  # refused at plan time: exit 2, a message, nothing read
    rows = _rows(plan)
    assert all(r.error is None or isinstance(r.error, RowError) for r in rows)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    real_photo("chelsea").resize((64, 48)).save(buf, format="JPEG")
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    real_photo("coffee").resize((40, 30)).save(buf, format="PNG")
    return buf.getvalue()


@_SETTINGS
@given(
    source=st.sampled_from(["jpeg", "png"]),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(0, 255)), max_size=8),
)
def test_decode_fuzz_truncated_and_garbled_images(
    source: str, cut: float, flips: list[tuple[float, int]]
) -> None:
    data = bytearray(_jpeg() if source == "jpeg" else _png())
    for where, value in flips:
        data[int(where * len(data))] = value
    data = data[: max(1, int(cut * len(data)))] if cut < 1.0 else data
    try:
        image = decode_image(bytes(data))
    except RowError as e:
        if len(data) >= 4:  # a shorter hex string could be part of a word
            assert bytes(data[:8]).hex() not in str(e)
    else:
        assert image.mode == "RGB"


# ---- local paths that are not regular files ---------------------------------------------


@pytest.fixture()
def hostile_paths(tmp_path: Path) -> Iterator[dict[str, tuple[str, str]]]:
    """name -> (path, expected code)."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    sock_path = tmp_path / "sock.jpg"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    paths = {
        "fifo": (str(fifo), "is_fifo"),
        "directory": (str(folder), "is_directory"),
        "dev_zero": ("/dev/zero", "is_device"),
        "dev_urandom": ("/dev/urandom", "is_device"),
        "socket": (str(sock_path), "is_socket"),
        "symlink_loop": (str(loop), "symlink_loop"),
        "missing": (str(tmp_path / "missing.jpg"), "not_found"),
        "nul_in_path": (str(tmp_path) + "/a\x00b.jpg", "bad_path"),
        "zero_bytes": (str(empty), "empty_file"),
    }
    try:
        yield paths
    finally:
        server.close()


def test_local_paths_that_are_not_regular_files_fail_at_once(
    hostile_paths: dict[str, tuple[str, str]],
) -> None:
    options = default_fetch(retries=3, backoff_s=0.5, timeout_s=5.0)
    for name, (path, code) in hostile_paths.items():
        start = time.monotonic()
        try:
            decode_image(fetch_bytes(path, options))
        except RowError as e:
            got = e.code.value
        else:
            got = "ok"
        elapsed = time.monotonic() - start
        assert got == code, name
        assert elapsed < 0.4, (name, elapsed)  # no blocking read, no retry


def test_unreadable_and_oversized_local_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(b"x" * 2000)
    with pytest.raises(RowError) as info:
        fetch_bytes(str(path), default_fetch(max_bytes=1000))
    assert info.value.code is ErrorCode.TOO_LARGE
    real_open = os.open

    def deny(p: Any, *args: Any, **kwargs: Any) -> int:
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)  # root reads any file; simulate EACCES
    with pytest.raises(RowError) as info:
        fetch_bytes(str(path), default_fetch())
    assert info.value.code is ErrorCode.PERMISSION_DENIED


def test_a_stuck_read_on_a_network_mount_is_cut_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transforms.images import fetch, local

    def stuck(path: str, limit: int) -> bytes:
        time.sleep(3)
        return b""

    monkeypatch.setattr(local, "read_mount_table", lambda path: [("/", "nfs4")])
    monkeypatch.setattr(fetch, "read_local_file", stuck)
    _assert_cut_at_the_deadline("/some/file.jpg")


def test_a_directory_that_hangs_while_resolved_is_cut_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transforms.images import local

    def hung(path: str, mounts: Any) -> str:
        time.sleep(3)  # realpath on a hung mount
        return "ext4"

    monkeypatch.setattr(local, "filesystem_of", hung)
    _assert_cut_at_the_deadline("/mnt/hung/file.jpg")


def _assert_cut_at_the_deadline(path: str) -> None:
    """A fetch of `path` that would block for 3 s fails as `timeout` at its 0.3 s deadline."""
    start = time.monotonic()
    with pytest.raises(RowError) as info:
        fetch_bytes(path, default_fetch(timeout_s=0.3, retries=0))
    assert info.value.code is ErrorCode.TIMEOUT
    assert time.monotonic() - start < 1.5


def test_files_on_local_disks_are_read_in_the_calling_thread(tmp_path: Path) -> None:
    from transforms.images.fetch import Fetcher

    class Counting(concurrent.futures.ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args: Any, **kwargs: Any) -> Any:
            Counting.submitted += 1
            return super().submit(*args, **kwargs)

    photos = [tmp_path / f"{n}.jpg" for n in range(5)]
    for n, photo in enumerate(photos):
        photo.write_bytes(b"\xff\xd8 not really a jpeg %d" % n)
    fetcher = Fetcher(default_fetch())
    fetcher._readers = Counting(max_workers=2)
    try:
        assert [fetcher.fetch(str(p)) for p in photos] == [p.read_bytes() for p in photos]
        assert Counting.submitted == 1  # the directory's classification; no read
        # A symlink may point onto a network mount: read under the deadline.
        (tmp_path / "link.jpg").symlink_to(photos[0])
        assert fetcher.fetch(str(tmp_path / "link.jpg")) == photos[0].read_bytes()
        assert Counting.submitted == 2
    finally:
        fetcher.close()


def test_the_mount_table_names_each_directorys_filesystem(tmp_path: Path) -> None:
    from transforms.images.local import LocalFilesystems, filesystem_of, read_mount_table

    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "30 22 0:40 / /mnt rw shared:9 - tmpfs tmpfs rw\n"
        "31 30 0:41 / /mnt/photos rw - nfs4 server:/photos rw\n"
        "32 30 0:42 / /mnt/my\\040bucket rw - fuse.gcsfuse bucket rw\n"
    )
    mounts = read_mount_table(str(table))
    assert filesystem_of("/mnt/photos/2024/a.jpg", mounts) == "nfs4"
    assert filesystem_of("/mnt/photosphere", mounts) == "tmpfs"  # a prefix, not a parent
    assert filesystem_of("/mnt/my bucket/x", mounts) == "fuse.gcsfuse"
    assert filesystem_of("/home/me", mounts) == "ext4"
    filesystems = LocalFilesystems(str(table))
    assert filesystems.classify("/home/me") and filesystems.known("/home/me")
    assert not filesystems.classify("/mnt/photos/2024")
    assert not filesystems.classify("/mnt/my bucket")
    # No mount table (another OS): every read keeps its deadline.
    assert not LocalFilesystems(str(tmp_path / "missing")).classify("/home/me")


# ---- pixel limit ----------------------------------------------------------------------


@pytest.mark.slow
def test_pixel_limit_works_in_both_directions() -> None:
    # 9500 x 9500 = 90.25 MP: over Pillow's own 89.5 MP default, under ours.
    buf = io.BytesIO()
    Image.new("1", (9500, 9500)).save(buf, format="PNG")
    data = buf.getvalue()
    assert decode_image(data).size == (9500, 9500)  # the documented default: 178,956,970
    with pytest.raises(RowError) as info:
        decode_image(data, max_pixels=90_000_000)
    assert info.value.code is ErrorCode.TOO_LARGE
    assert decode_image(data, max_pixels=200_000_000).size == (9500, 9500)


def test_pixel_limit_lowered() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, format="PNG")
    with pytest.raises(RowError) as info:
        decode_image(buf.getvalue(), max_pixels=1000)
    assert info.value.code is ErrorCode.TOO_LARGE and "40x30" in str(info.value)


def test_messages_never_carry_file_contents(tmp_path: Path) -> None:
    secret = b"\x01\x02SECRET-TOKEN-123 \xff\xfe" * 4
    with pytest.raises(RowError) as info:
        decode_image(secret)
    assert "SECRET" not in str(info.value) and secret[:8].hex() not in str(info.value)


# ---- the whole job over every case, and memory ------------------------------------------


@pytest.mark.slow
def test_mixed_hostile_manifest_one_row_each_with_its_code(
    hostile_paths: dict[str, tuple[str, str]],
    tiny_vit: Path,
    photo_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(manifest_reader, "MAX_LINE_BYTES", 4096)
    good = str(photo_dir / "chelsea.jpg")
    lines = [b"uri,expect,note"]
    for path, code in hostile_paths.values():
        if "\x00" in path:
            continue  # csv cannot carry a NUL; covered by the unit test
        lines.append(f"{path},{code},".encode())
    lines.append(f"{good},ok,".encode())
    lines.append(f'{good},ok,"{"z" * 3000}"'.encode())  # a big field, under the limit
    lines.append("caf\xe9.jpg,bad_encoding,".encode("latin-1"))
    lines.append(f"{'w' * 6000}.jpg,line_too_long,".encode())
    lines.append(f"{good},malformed_row,,extra".encode())
    lines.append(f"{good},ok,".encode())
    manifest = tmp_path / "hostile.csv"
    manifest.write_bytes(codecs.BOM_UTF8 + b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    start = time.monotonic()
    args = ["--input", str(manifest), "--output", str(out), "--model", str(tiny_vit)]
    assert run_job([*args, "--fetch-timeout", "5"]) == EXIT_OK
    assert time.monotonic() - start < 60
    table = read_output(out).to_pylist()
    assert len(table) == len(lines) - 1
    for row in table:
        code = row["error"].split(":", 1)[0] if row["error"] else "ok"
        if row["expect"] is None:  # rows that failed at read time carry no values
            assert code in ("bad_encoding", "line_too_long"), row
        else:
            assert code == row["expect"], row
    codes = sorted(r["error"].split(":", 1)[0] for r in table if r["error"])
    assert "bad_encoding" in codes and "line_too_long" in codes
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rows_in"] == summary["rows_out"] == len(lines) - 1


@pytest.mark.slow
def test_huge_lines_keep_memory_bounded(tiny_vit: Path, photo_dir: Path, tmp_path: Path) -> None:
    """A 300 MB line in a manifest: the job finishes, that line is an error row, and
    peak RSS stays far under 2 GiB (the whole line is never in memory)."""
    manifest = tmp_path / "huge.txt"
    good = str(photo_dir / "chelsea.jpg")
    with manifest.open("wb") as f:
        f.write(good.encode() + b"\n")
        chunk = b"h" * (1 << 20)
        for _ in range(300):
            f.write(chunk)
        f.write(b"\n" + good.encode() + b"\n")
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from pipelines.label_images import run\n"
        "rc = run(sys.argv[1:], save_main_session=False)\n"
        "peak = next(int(l.split()[1]) for l in open('/proc/self/status') "
        "if l.startswith('VmHWM:'))\n"
        "print('PEAK_KB', peak)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--input",
            str(manifest),
            "--output",
            str(out),
            "--model",
            str(tiny_vit),
            "--progress",
            "false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_kb = int(proc.stdout.split("PEAK_KB")[1].split()[0])
    assert peak_kb < 2 * 1024 * 1024, peak_kb
    rows = read_output(out).to_pylist()
    assert len(rows) == 3
    assert sorted(r["status"] for r in rows) == ["invalid_input", "ok", "ok"]


def test_cli_duplicate_header_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.csv"
    path.write_text("uri,uri\na.jpg,b.jpg\n")
    assert run_job(["--input", str(path), "--output", str(tmp_path / "o")]) == EXIT_BAD_CONFIG
    err = capsys.readouterr().err.strip()
    assert "'uri' twice" in err and len(err.splitlines()) == 1
