"""Fetching image bytes: concurrent, bounded, retried, every failure an error code.

http(s) goes through one aiohttp session per worker, on an event loop in a
background thread, with a global and a per-host concurrency cap. gs:// (gcsfs)
and s3:// (s3fs) go through fsspec's async filesystems, one ranged read per
attempt under a deadline. Local paths are checked with `stat` first, so a FIFO,
a device or a directory is an error row at once instead of a blocking read;
files on local disks are read in the calling thread, those on network or FUSE
mounts on a reader thread under the deadline (`LocalFilesystems`).
`--fetch-timeout` is a total deadline per attempt for every scheme.

Only transient failures are retried (HTTP 408/425/429/5xx, timeouts, connection
resets, incomplete bodies), with exponential backoff and full jitter, honouring
`Retry-After`. 4xx other than those are final at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import errno
import itertools
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import fsspec

from transforms.errors import ErrorCode, RowError, redact_uri
from transforms.images.guard import check_host, guarded_resolver
from transforms.images.local import LocalFilesystems, read_local_file
from transforms.uri import scheme_of, strip_file_scheme

logger = logging.getLogger(__name__)

DEFAULT_ALLOWED_SCHEMES: tuple[str, ...] = ("file", "gs", "s3", "http", "https")
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {ErrorCode.TIMEOUT, ErrorCode.CONNECTION, ErrorCode.INCOMPLETE_DOWNLOAD}
)
_USER_AGENT = "beam-image-labeler/0.1 (+batch image labeling)"

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class FetchOptions:
    """How images are fetched: built by `LabelingSpec.fetch`, where every option
    has its default, check and help text (`LabelingSpec().fetch` for defaults).

    Attributes:
        allowed_schemes: URI schemes that may be fetched; others are `invalid_input`.
        timeout_s: deadline of one fetch attempt (connect, headers and body), for
            every scheme.
        max_bytes: a download past this size is aborted (`too_large`).
        retries: extra attempts after a transient failure (0 = no retry).
        concurrency: fetches in flight per worker process.
        per_host: fetches in flight per host (http/https), so one slow host cannot
            take every slot and no site gets hammered.
        backoff_s: first retry delay; doubles each attempt, with full jitter.
        max_backoff_s: cap on one retry delay, `Retry-After` included.
        max_redirects: HTTP redirects followed before `too_many_redirects`.
        block_private_networks: also refuse loopback and private addresses (link-local
            and cloud metadata addresses are always refused).
    """

    allowed_schemes: tuple[str, ...]
    timeout_s: float
    max_bytes: int
    retries: int
    concurrency: int
    per_host: int
    block_private_networks: bool
    # Not options: fixed policy, overridden only by tests.
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_redirects: int = 10


def check_uri(uri: str | None, options: FetchOptions) -> str:
    """Validate a URI before fetching it.

    Raises:
        RowError: `empty_uri` or `unsupported_scheme`.
    """
    if uri is None or not uri.strip():
        raise RowError(ErrorCode.EMPTY_URI, "the row has no image URI")
    uri = uri.strip()
    scheme = scheme_of(uri)
    if scheme not in options.allowed_schemes:
        raise RowError(
            ErrorCode.UNSUPPORTED_SCHEME,
            f"scheme {scheme!r} of {redact_uri(uri)} is not in allowed schemes "
            f"{list(options.allowed_schemes)}",
        )
    return uri


def http_error(uri: str, status: int) -> RowError:
    where = redact_uri(uri)
    if status == 404:
        return RowError(ErrorCode.HTTP_404, f"{where}: HTTP 404")
    if 500 <= status < 600:
        return RowError(ErrorCode.HTTP_5XX, f"{where}: HTTP {status}")
    return RowError(ErrorCode.HTTP_4XX, f"{where}: HTTP {status}")


def classify_fetch_error(uri: str, error: BaseException) -> RowError:
    """Turn any exception raised by a fetch into a `RowError` with a stable code."""
    if isinstance(error, RowError):
        return error
    where = redact_uri(uri)
    if isinstance(error, ImportError):
        return RowError(
            ErrorCode.UNSUPPORTED_SCHEME,
            f"{where}: the {scheme_of(uri)}:// filesystem is not installed ({error.name or error})",
        )
    detail = f"{where}: {type(error).__name__}: {error}"
    name = type(error).__name__.lower()
    if scheme_of(uri) == "file":
        return _local_error(where, error)
    status = _http_status(error)
    if status is not None:
        return http_error(uri, status)
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return RowError(ErrorCode.NOT_FOUND, where)
    if isinstance(error, PermissionError):
        return RowError(ErrorCode.PERMISSION_DENIED, where)
    if isinstance(error, OSError) and error.errno == errno.ELOOP:
        return RowError(ErrorCode.SYMLINK_LOOP, where)
    if isinstance(error, (TimeoutError, asyncio.TimeoutError, socket.timeout)) or "timeout" in name:
        return RowError(ErrorCode.TIMEOUT, detail)
    if "payload" in name or "incompleteread" in name or "contentlength" in name:
        return RowError(ErrorCode.INCOMPLETE_DOWNLOAD, detail)
    if "redirect" in name:
        return RowError(ErrorCode.TOO_MANY_REDIRECTS, detail)
    if isinstance(error, OSError) and error.errno == errno.ENOENT:
        return RowError(ErrorCode.NOT_FOUND, where)
    if isinstance(error, (ConnectionError, OSError)) or "connect" in name:
        return RowError(ErrorCode.CONNECTION, detail)
    return RowError(ErrorCode.FETCH_FAILED, detail)


_LOCAL_ERRNO = {
    errno.ENOENT: ErrorCode.NOT_FOUND,
    errno.ENOTDIR: ErrorCode.NOT_FOUND,
    errno.EACCES: ErrorCode.PERMISSION_DENIED,
    errno.EPERM: ErrorCode.PERMISSION_DENIED,
    errno.ELOOP: ErrorCode.SYMLINK_LOOP,
    errno.EISDIR: ErrorCode.IS_DIRECTORY,
    errno.ENAMETOOLONG: ErrorCode.BAD_PATH,
    errno.ENXIO: ErrorCode.NOT_A_FILE,
}


def _local_error(where: str, error: BaseException) -> RowError:
    """A local read's failure: never a network code, never retried (but `timeout`)."""
    if isinstance(error, (TimeoutError, concurrent.futures.TimeoutError)):
        return RowError(ErrorCode.TIMEOUT, f"{where}: {error}")
    if isinstance(error, ValueError):  # e.g. an embedded NUL byte in the path
        return RowError(ErrorCode.BAD_PATH, f"{where}: {error}")
    if isinstance(error, OSError) and error.errno in _LOCAL_ERRNO:
        return RowError(_LOCAL_ERRNO[error.errno], where)
    if isinstance(error, OSError):
        return RowError(ErrorCode.READ_ERROR, f"{where}: {error.strerror or type(error).__name__}")
    return RowError(ErrorCode.FETCH_FAILED, f"{where}: {type(error).__name__}")


def _http_status(error: BaseException) -> int | None:
    """The HTTP status carried by an aiohttp, gcsfs, requests or google-api error."""
    for attr in ("status", "code", "status_code"):
        value = getattr(error, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def is_transient(error: RowError, status: int | None = None) -> bool:
    if status is not None:
        return status in TRANSIENT_HTTP
    return error.code in _TRANSIENT_CODES or error.code is ErrorCode.HTTP_5XX


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a `Retry-After` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, options: FetchOptions, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter; a server's Retry-After wins when longer."""
    base = min(options.max_backoff_s, options.backoff_s * (2**attempt))
    delay = random.uniform(0, base)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, options.max_backoff_s)


class _TransientStatus(Exception):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


class Fetcher:
    """Fetches whole objects by URI; thread-safe; one per worker process.

    Example::

        fetcher = Fetcher(LabelingSpec(fetch_retries=2).fetch)
        data = fetcher.fetch("https://example.org/cat.jpg")  # bytes, or raises RowError
        fetcher.close()
    """

    def __init__(self, options: FetchOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: Any = None
        self._global: asyncio.Semaphore | None = None
        self._hosts: dict[str, asyncio.Semaphore] = {}
        self._sync_slots = threading.BoundedSemaphore(self.options.concurrency)
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._filesystems = LocalFilesystems()

    # -- lifecycle -------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="fetch-loop", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
            readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=False, cancel_futures=True)
        if loop is None:
            return
        if self._session is not None:
            asyncio.run_coroutine_threadsafe(self._session.close(), loop).result(timeout=10)
            self._session = None
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- fetching --------------------------------------------------------------

    def fetch(self, uri: str | None) -> bytes:
        """The object's bytes (at most `max_bytes`).

        Raises:
            RowError: `invalid_input` or `fetch_error` codes; never anything else.
        """
        uri = check_uri(uri, self.options)
        if scheme_of(uri) in ("http", "https"):
            return self.fetch_async(uri).result()
        with self._sync_slots:
            return self._with_retries(uri, lambda: self._fetch_fsspec(uri))

    def fetch_async(self, uri: str) -> concurrent.futures.Future[bytes]:
        """Start an http(s) fetch on the event loop; the future raises `RowError`."""
        uri = check_uri(uri, self.options)
        loop = self._ensure_loop()
        return asyncio.run_coroutine_threadsafe(self._fetch_http_classified(uri), loop)

    async def _fetch_http_classified(self, uri: str) -> bytes:
        try:
            return await self._fetch_http(uri)
        except RowError:
            raise
        except Exception as e:  # a bug in the async path must still be a row
            raise classify_fetch_error(uri, e) from e

    def _retry_delay(self, uri: str, failure: Exception, attempt: int) -> float:
        """The retry policy, for both paths: the seconds to wait before attempt
        `attempt + 1` after `failure`, or the row's final `RowError` raised.

        Only transient failures are retried, at most `retries` times, with
        backoff; a 408/425/429/5xx response's Retry-After is honoured.
        """
        if isinstance(failure, _TransientStatus):
            error = http_error(uri, failure.status)
            transient, retry_after = True, failure.retry_after
        elif isinstance(failure, RowError):
            raise failure
        else:
            error = classify_fetch_error(uri, failure)
            transient, retry_after = is_transient(error, _http_status(failure)), None
        if attempt >= self.options.retries or not transient:
            raise error from (None if isinstance(failure, _TransientStatus) else failure)
        logger.debug("Retrying %s after %s", redact_uri(uri), error.code.value)
        return backoff_delay(attempt, self.options, retry_after)

    def _with_retries(self, uri: str, call: Callable[[], T]) -> T:
        for attempt in itertools.count():
            try:
                return call()
            except Exception as e:
                delay = self._retry_delay(uri, e, attempt)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _fetch_fsspec(self, uri: str) -> bytes:
        """One attempt at a local, gs:// or s3:// object, within the deadline."""
        limit = self.options.max_bytes
        timeout = self.options.timeout_s
        if scheme_of(uri) == "file":
            path = strip_file_scheme(uri)
            if self._on_local_disk(path, timeout):
                data = read_local_file(path, limit)  # finishes: no thread, no deadline
            else:
                data = self._with_deadline(lambda: read_local_file(path, limit), timeout)
        else:
            from fsspec.asyn import AsyncFileSystem, sync

            fs, path = fsspec.core.url_to_fs(uri)
            if isinstance(fs, AsyncFileSystem):
                # One ranged read, cancelled at the deadline (gcsfs and s3fs retry
                # internally; the deadline bounds the whole attempt).
                try:
                    data = sync(
                        fs.loop, fs._cat_file, path, start=0, end=limit + 1, timeout=timeout
                    )
                except fsspec.exceptions.FSTimeoutError:
                    raise TimeoutError(f"no complete response within {timeout:g}s") from None
            else:
                data = self._with_deadline(
                    lambda: fs.cat_file(path, start=0, end=limit + 1), timeout
                )
        if len(data) > self.options.max_bytes:
            raise RowError(
                ErrorCode.TOO_LARGE,
                f"{redact_uri(uri)} is larger than the {self.options.max_bytes} byte limit",
            )
        return data

    def _on_local_disk(self, path: str, timeout: float) -> bool:
        """Whether `path` can be read in this thread: a file (not a symlink) in a
        directory on a local filesystem. A directory is classified once, under
        the deadline (resolving it may touch a hung mount)."""
        directory = os.path.dirname(os.path.abspath(path))
        local = self._filesystems.known(directory)
        if local is None:
            local = self._with_deadline(lambda: self._filesystems.classify(directory), timeout)
        return local and self._filesystems.reads_directly(path)

    def _with_deadline(self, read: Callable[[], T], timeout: float) -> T:
        """`read()` on a reader thread, given up after `timeout` seconds.

        A read stuck in the kernel (a hung network mount) cannot be
        interrupted; the row fails as `timeout` and the reader thread is left
        to finish on its own.
        """
        with self._lock:
            if self._readers is None:
                self._readers = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.options.concurrency, thread_name_prefix="read"
                )
        future = self._readers.submit(read)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the read did not finish within {timeout:g}s") from None

    async def _http_session(self) -> Any:
        import aiohttp

        if self._session is None:
            self._global = asyncio.Semaphore(self.options.concurrency)
            connector = aiohttp.TCPConnector(
                limit=self.options.concurrency,
                limit_per_host=self.options.per_host,
                resolver=guarded_resolver(self.options.block_private_networks),
            )
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"User-Agent": _USER_AGENT}
            )
        return self._session

    async def _fetch_http(self, uri: str) -> bytes:
        session = await self._http_session()
        host = urlsplit(uri).netloc.rsplit("@", 1)[-1].lower()
        if host not in self._hosts:
            self._hosts[host] = asyncio.Semaphore(self.options.per_host)
        assert self._global is not None
        for attempt in itertools.count():
            try:
                async with self._global, self._hosts[host]:
                    return await self._http_once(session, uri)
            except Exception as e:
                delay = self._retry_delay(uri, e, attempt)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _http_once(self, session: Any, uri: str) -> bytes:
        """One attempt, redirects included, under one deadline."""
        try:
            return await asyncio.wait_for(self._http_attempt(session, uri), self.options.timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no complete response within {self.options.timeout_s:g}s") from None

    async def _http_attempt(self, session: Any, uri: str) -> bytes:
        """Redirects are followed here, not by aiohttp, so every hop's host passes the
        address guard (a literal IP never reaches the resolver)."""
        url = uri
        for _ in range(self.options.max_redirects + 1):
            check_host(uri, url, self.options.block_private_networks)
            async with session.get(url, allow_redirects=False) as response:
                location = response.headers.get("Location")
                if response.status in (301, 302, 303, 307, 308) and location:
                    url = urljoin(url, location)
                    if scheme_of(url) not in ("http", "https"):
                        raise RowError(
                            ErrorCode.UNSUPPORTED_SCHEME,
                            f"{redact_uri(uri)} redirects to a {scheme_of(url)}:// URI",
                        )
                    continue
                return await self._read_body(uri, response)
        raise RowError(
            ErrorCode.TOO_MANY_REDIRECTS,
            f"{redact_uri(uri)}: more than {self.options.max_redirects} redirects",
        )

    async def _read_body(self, uri: str, response: Any) -> bytes:
        limit = self.options.max_bytes
        if response.status >= 400:
            if response.status in TRANSIENT_HTTP:
                raise _TransientStatus(
                    response.status, retry_after_seconds(response.headers.get("Retry-After"))
                )
            raise http_error(uri, response.status)
        if response.content_length is not None and response.content_length > limit:
            raise RowError(
                ErrorCode.TOO_LARGE,
                f"{redact_uri(uri)} is {response.content_length} bytes, over the "
                f"{limit} byte limit",
            )
        data = bytearray()
        async for chunk in response.content.iter_chunked(1 << 16):
            data += chunk
            if len(data) > limit:
                raise RowError(
                    ErrorCode.TOO_LARGE,
                    f"{redact_uri(uri)} is larger than the {limit} byte limit",
                )
        return bytes(data)


def fetch_bytes(uri: str | None, options: FetchOptions) -> bytes:
    """Fetch one object with a short-lived `Fetcher` (for one-off use and tests)."""
    fetcher = Fetcher(options)
    try:
        return fetcher.fetch(uri)
    finally:
        fetcher.close()
