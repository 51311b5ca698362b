"""Tier 4: real fetching against a loopback HTTP server with fault injection."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import default_fetch
from tests.http_server import FaultServer, serve
from transforms.errors import ErrorCode, RowError, Status
from transforms.images.fetch import Fetcher, backoff_delay, retry_after_seconds


def _jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "orange").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def server() -> Iterator[FaultServer]:
    with serve({"cat.jpg": _jpeg(), "big.jpg": _jpeg((800, 600))}) as srv:
        yield srv


def _fetch(server: FaultServer, path: str, **options: object) -> bytes:
    opts = default_fetch(**{"retries": 3, "backoff_s": 0.05, "timeout_s": 5.0, **options})
    fetcher = Fetcher(opts)
    try:
        return fetcher.fetch(server.url(path))
    finally:
        fetcher.close()


def _error(server: FaultServer, path: str, **options: object) -> RowError:
    with pytest.raises(RowError) as info:
        _fetch(server, path, **options)
    return info.value


def test_ok(server: FaultServer) -> None:
    assert _fetch(server, "/img/cat.jpg") == server.images["cat.jpg"]


def test_404_is_final_and_not_retried(server: FaultServer) -> None:
    error = _error(server, "/missing")
    assert (error.status, error.code) == (Status.FETCH_ERROR, ErrorCode.HTTP_404)
    assert server.hits["/missing"] == 1


def test_403_is_not_retried(server: FaultServer) -> None:
    error = _error(server, "/forbidden")
    assert error.code is ErrorCode.HTTP_4XX and "403" in str(error)
    assert server.hits["/forbidden"] == 1


def test_500_then_200_ends_ok(server: FaultServer) -> None:
    assert _fetch(server, "/flaky/a/2/cat.jpg") == server.images["cat.jpg"]
    assert server.hits["flaky:a"] == 3


def test_persistent_500_gives_http_5xx_after_the_retries(server: FaultServer) -> None:
    error = _error(server, "/flaky/b/99/cat.jpg", retries=2)
    assert error.code is ErrorCode.HTTP_5XX
    assert server.hits["flaky:b"] == 3  # one try + two retries


def test_429_honours_retry_after(server: FaultServer) -> None:
    start = time.monotonic()
    assert _fetch(server, "/limited/c/cat.jpg") == server.images["cat.jpg"]
    assert time.monotonic() - start >= 0.9  # waited the server's Retry-After: 1
    assert server.hits["limited:c"] == 2


def test_stall_past_the_timeout(server: FaultServer) -> None:
    error = _error(server, "/stall/3/cat.jpg", timeout_s=0.5, retries=1)
    assert (error.status, error.code) == (Status.FETCH_ERROR, ErrorCode.TIMEOUT)
    assert server.hits["/stall/3/cat.jpg"] == 2  # timeouts are retried


def test_truncated_body(server: FaultServer) -> None:
    error = _error(server, "/truncated/big.jpg", retries=1)
    assert error.code is ErrorCode.INCOMPLETE_DOWNLOAD
    assert server.hits["/truncated/big.jpg"] == 2


def test_redirect_chain_is_followed_with_a_bound(server: FaultServer) -> None:
    assert _fetch(server, "/redirect/3/cat.jpg") == server.images["cat.jpg"]
    error = _error(server, "/redirect/12/cat.jpg", max_redirects=5)
    assert error.code is ErrorCode.TOO_MANY_REDIRECTS


def test_wrong_content_type_is_ignored(server: FaultServer) -> None:
    assert _fetch(server, "/as-html/cat.jpg") == server.images["cat.jpg"]


@pytest.mark.parametrize("route", ["/big/5000", "/big-chunked/300000"])
def test_body_past_the_byte_cap(server: FaultServer, route: str) -> None:
    error = _error(server, route, max_bytes=4096)
    assert error.code is ErrorCode.TOO_LARGE


def test_connection_refused() -> None:
    fetcher = Fetcher(default_fetch(retries=1, backoff_s=0.01, timeout_s=2))
    with pytest.raises(RowError) as info:
        fetcher.fetch("http://127.0.0.1:9/nothing-listens-here.jpg")
    fetcher.close()
    assert info.value.code is ErrorCode.CONNECTION


def test_query_strings_are_redacted(server: FaultServer) -> None:
    error = _error(server, "/missing?X-Goog-Signature=SECRET123")
    assert "SECRET123" not in str(error)


def test_retry_after_parsing_and_backoff() -> None:
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert retry_after_seconds("soon") is None
    options = default_fetch(backoff_s=1.0, max_backoff_s=4.0)
    assert all(0 <= backoff_delay(a, options) <= 4.0 for a in range(10))
    assert backoff_delay(0, options, retry_after=3.0) >= 3.0
    assert backoff_delay(0, options, retry_after=100.0) == 4.0


def test_per_host_cap_bounds_concurrency(server: FaultServer) -> None:
    """With per_host=2, ten 0.3 s downloads from one host take about 5 rounds."""
    from concurrent.futures import ThreadPoolExecutor

    fetcher = Fetcher(default_fetch(per_host=2, concurrency=10))
    start = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        results = list(
            pool.map(fetcher.fetch, [server.url(f"/stall/0.3/cat.jpg?{i}") for i in range(10)])
        )
    elapsed = time.monotonic() - start
    fetcher.close()
    assert all(r == server.images["cat.jpg"] for r in results)
    assert elapsed >= 1.4  # 5 rounds of 0.3 s, not 1


def test_local_files_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"abc")
    fetcher = Fetcher(default_fetch())
    assert fetcher.fetch(str(path)) == b"abc"
    assert fetcher.fetch(f"file://{path}") == b"abc"
    with pytest.raises(RowError) as info:
        fetcher.fetch(str(tmp_path / "nope"))
    assert info.value.code is ErrorCode.NOT_FOUND
    fetcher.close()


class _Stall(BaseHTTPRequestHandler):
    """Every request waits until the test ends: a GCS endpoint that never answers."""

    release = threading.Event()
    hits = 0

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).hits += 1
        self.release.wait(30)


@pytest.mark.slow  # waits out real deadlines
def test_gs_fetch_honours_the_deadline_per_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """gcsfs retries on its own for over a minute; --fetch-timeout bounds each attempt."""
    import gcsfs

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stall)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{host!s}:{port}")
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    gcsfs.GCSFileSystem.clear_instance_cache()
    fetcher = Fetcher(default_fetch(timeout_s=1.0, retries=1, backoff_s=0.01))
    try:
        start = time.monotonic()
        with pytest.raises(RowError) as info:
            fetcher.fetch("gs://bucket/cat.jpg")
        elapsed = time.monotonic() - start
    finally:
        fetcher.close()
        _Stall.release.set()
        server.shutdown()
        gcsfs.GCSFileSystem.clear_instance_cache()
    assert info.value.code is ErrorCode.TIMEOUT
    assert _Stall.hits >= 2  # one request per attempt at least
    assert 2.0 <= elapsed < 4.0, elapsed  # 2 attempts x 1 s, plus backoff
