"""Fetching image bytes: concurrent, bounded, retried, every failure an error code.

http(s) goes through one aiohttp session per worker, on an event loop in a
background thread, with a global and a per-host concurrency cap. gs:// (gcsfs)
and s3:// (s3fs) go through fsspec's async filesystems, one ranged read per
attempt under a deadline. Local paths are checked with `stat` first, so a FIFO,
a device or a directory is an error row at once instead of a blocking read.
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
import ipaddress
import logging
import os
import random
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import fsspec

from transforms.errors import ErrorCode, RowError, redact_uri

logger = logging.getLogger(__name__)

DEFAULT_ALLOWED_SCHEMES: tuple[str, ...] = ("file", "gs", "s3", "http", "https")
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {ErrorCode.TIMEOUT, ErrorCode.CONNECTION, ErrorCode.INCOMPLETE_DOWNLOAD}
)
_USER_AGENT = "beam-image-labeler/0.1 (+batch image labeling)"

T = TypeVar("T")


@dataclass(frozen=True)
class FetchOptions:
    """How images are fetched.

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

    allowed_schemes: tuple[str, ...] = DEFAULT_ALLOWED_SCHEMES
    timeout_s: float = 30.0
    max_bytes: int = 50 << 20
    retries: int = 3
    concurrency: int = 64
    per_host: int = 32
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_redirects: int = 10
    block_private_networks: bool = False


def scheme_of(uri: str) -> str:
    """The URI scheme, ``file`` for plain paths."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


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

        fetcher = Fetcher(FetchOptions(retries=2))
        data = fetcher.fetch("https://example.org/cat.jpg")  # bytes, or raises RowError
        fetcher.close()
    """

    def __init__(self, options: FetchOptions | None = None) -> None:
        self.options = options or FetchOptions()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: Any = None
        self._global: asyncio.Semaphore | None = None
        self._hosts: dict[str, asyncio.Semaphore] = {}
        self._sync_slots = threading.BoundedSemaphore(self.options.concurrency)
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None

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

    def _with_retries(self, uri: str, call: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return call()
            except Exception as e:
                error = classify_fetch_error(uri, e)
                status = _http_status(e)
                if attempt >= self.options.retries or not is_transient(error, status):
                    raise error from e
                logger.debug("Retrying %s after %s", redact_uri(uri), error.code.value)
                time.sleep(backoff_delay(attempt, self.options))
                attempt += 1

    def _fetch_fsspec(self, uri: str) -> bytes:
        """One attempt at a local, gs:// or s3:// object, within the deadline."""
        limit = self.options.max_bytes
        timeout = self.options.timeout_s
        if scheme_of(uri) == "file":
            path = uri[len("file://") :] if uri.startswith("file://") else uri
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

    def _with_deadline(self, read: Callable[[], bytes], timeout: float) -> bytes:
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
                resolver=_guarded_resolver(self.options.block_private_networks),
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
        attempt = 0
        while True:
            try:
                async with self._global, self._hosts[host]:
                    return await self._http_once(session, uri)
            except _TransientStatus as e:
                error = http_error(uri, e.status)
                if attempt >= self.options.retries:
                    raise error from None
                logger.debug("Retrying %s after %s", redact_uri(uri), error.code.value)
                await asyncio.sleep(backoff_delay(attempt, self.options, e.retry_after))
            except RowError:
                raise
            except Exception as e:
                error = classify_fetch_error(uri, e)
                if attempt >= self.options.retries or not is_transient(error):
                    raise error from e
                logger.debug("Retrying %s after %s", redact_uri(uri), error.code.value)
                await asyncio.sleep(backoff_delay(attempt, self.options))
            attempt += 1

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


_LOCAL_KINDS = (
    (stat.S_ISDIR, ErrorCode.IS_DIRECTORY, "is a directory"),
    (stat.S_ISFIFO, ErrorCode.IS_FIFO, "is a FIFO (named pipe)"),
    (stat.S_ISCHR, ErrorCode.IS_DEVICE, "is a character device"),
    (stat.S_ISBLK, ErrorCode.IS_DEVICE, "is a block device"),
    (stat.S_ISSOCK, ErrorCode.IS_SOCKET, "is a socket"),
)


def _check_regular(path: str, mode: int, size: int, limit: int) -> None:
    for test, code, what in _LOCAL_KINDS:
        if test(mode):
            raise RowError(code, f"{path} {what}, not a regular file")
    if not stat.S_ISREG(mode):
        raise RowError(ErrorCode.NOT_A_FILE, f"{path} is not a regular file")
    if size > limit:
        raise RowError(ErrorCode.TOO_LARGE, f"{path} is {size} bytes, over the {limit} byte limit")


def read_local_file(path: str, limit: int) -> bytes:
    """Read a local image file, never opening anything but a regular file.

    `stat` first: a FIFO would block `open` forever, `/dev/zero` would never
    end, a directory or socket cannot be read. The file is then opened
    non-blocking and checked again, in case it changed in between, and at
    most `limit + 1` bytes are read.

    Raises:
        RowError: a specific code per kind of path; OSError for other failures
            (classified by `classify_fetch_error`).
    """
    _check_regular(path, *_stat(path), limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        _check_regular(path, info.st_mode, info.st_size, limit)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)


def _stat(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_mode, info.st_size


# ---- the address guard ----------------------------------------------------------------

#: Refused for every http(s) fetch: link-local addresses, where cloud metadata
#: servers answer (169.254.169.254 on GCE, AWS and Azure; fd00:ec2::254 on AWS).
ALWAYS_BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32")
)
#: Metadata endpoints by name, refused before any lookup.
METADATA_HOSTS = frozenset(
    {
        "metadata.google.internal",
        "metadata.goog",
        "metadata",
        "instance-data",
        "instance-data.ec2.internal",
    }
)


def blocked_reason(address: str, block_private: bool) -> str | None:
    """Why an IP address may not be fetched from, or None."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    if any(ip in network for network in ALWAYS_BLOCKED):
        return "a link-local or cloud metadata address"
    if block_private and (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_unspecified
        or ip.is_multicast
        or ip in ipaddress.ip_network("100.64.0.0/10")
    ):
        return "a loopback or private address (--block-private-networks)"
    return None


def check_host(uri: str, url: str, block_private: bool) -> None:
    """Refuse a metadata host name or a blocked literal IP before connecting.

    Host names go through `_GuardedResolver`, which checks every address a name
    resolves to, so the address actually connected to is always checked.
    """
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host in METADATA_HOSTS:
        raise RowError(
            ErrorCode.BLOCKED_ADDRESS, f"{redact_uri(uri)}: {host} is a cloud metadata endpoint"
        )
    reason = blocked_reason(host, block_private)
    if reason:
        raise RowError(ErrorCode.BLOCKED_ADDRESS, f"{redact_uri(uri)}: {host} is {reason}")


def _guarded_resolver(block_private: bool) -> Any:
    from aiohttp.abc import AbstractResolver
    from aiohttp.resolver import DefaultResolver

    class _GuardedResolver(AbstractResolver):
        """DNS answers pass the address guard before aiohttp connects to them."""

        def __init__(self) -> None:
            self._inner = DefaultResolver()

        async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> Any:
            infos = await self._inner.resolve(host, port, family)
            for info in infos:
                reason = blocked_reason(str(info["host"]), block_private)
                if reason:
                    raise RowError(
                        ErrorCode.BLOCKED_ADDRESS,
                        f"{host} resolves to {info['host']}, {reason}",
                    )
            return infos

        async def close(self) -> None:
            await self._inner.close()

    return _GuardedResolver()


def fetch_bytes(uri: str | None, options: FetchOptions | None = None) -> bytes:
    """Fetch one object with a short-lived `Fetcher` (for one-off use and tests)."""
    fetcher = Fetcher(options)
    try:
        return fetcher.fetch(uri)
    finally:
        fetcher.close()
