"""Fetching image bytes through fsspec, with every failure mapped to an error code."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass
from typing import Any

import fsspec

from transforms.errors import ErrorCode, RowError, redact_uri

logger = logging.getLogger(__name__)

DEFAULT_ALLOWED_SCHEMES: tuple[str, ...] = ("file", "gs", "s3", "http", "https")


@dataclass(frozen=True)
class FetchOptions:
    """How images are fetched.

    Attributes:
        allowed_schemes: URI schemes that may be fetched; others are `invalid_input`.
        timeout_s: per-request timeout for network fetches.
        max_bytes: a download past this size is aborted (`too_large`).
    """

    allowed_schemes: tuple[str, ...] = DEFAULT_ALLOWED_SCHEMES
    timeout_s: float = 30.0
    max_bytes: int = 50 << 20


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


def _storage_options(scheme: str, options: FetchOptions) -> dict[str, Any]:
    if scheme in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=options.timeout_s)}}
    return {}


def fetch_bytes(uri: str, options: FetchOptions) -> bytes:
    """Read the whole object at `uri`, up to `options.max_bytes`.

    Raises:
        RowError: with a fetch error code; never anything else.
    """
    uri = check_uri(uri, options)
    scheme = scheme_of(uri)
    try:
        with fsspec.open(uri, "rb", **_storage_options(scheme, options)) as f:
            data: bytes = f.read(options.max_bytes + 1)
    except RowError:
        raise
    except Exception as e:  # every failure becomes a row; classify it
        raise classify_fetch_error(uri, e) from e
    if len(data) > options.max_bytes:
        raise RowError(
            ErrorCode.TOO_LARGE,
            f"{redact_uri(uri)} is larger than the {options.max_bytes} byte limit",
        )
    return data


def classify_fetch_error(uri: str, error: BaseException) -> RowError:
    """Turn any exception raised by a fetch into a `RowError` with a stable code."""
    where = redact_uri(uri)
    detail = f"{where}: {type(error).__name__}: {error}"
    status = _http_status(error)
    if status is not None:
        if status == 404:
            return RowError(ErrorCode.HTTP_404, f"{where}: HTTP 404")
        if 500 <= status < 600:
            return RowError(ErrorCode.HTTP_5XX, f"{where}: HTTP {status}")
        return RowError(ErrorCode.HTTP_4XX, f"{where}: HTTP {status}")
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return RowError(ErrorCode.NOT_FOUND, where)
    if isinstance(error, PermissionError):
        return RowError(ErrorCode.PERMISSION_DENIED, where)
    if isinstance(error, (TimeoutError, asyncio.TimeoutError, socket.timeout)) or (
        "timeout" in type(error).__name__.lower()
    ):
        return RowError(ErrorCode.TIMEOUT, detail)
    if isinstance(error, OSError) and error.errno == errno.ENOENT:
        return RowError(ErrorCode.NOT_FOUND, where)
    if isinstance(error, (ConnectionError, OSError)) or "connect" in type(error).__name__.lower():
        return RowError(ErrorCode.CONNECTION, detail)
    return RowError(ErrorCode.FETCH_FAILED, detail)


def _http_status(error: BaseException) -> int | None:
    """The HTTP status carried by an aiohttp, requests or google-api error."""
    for attr in ("status", "code", "status_code"):
        value = getattr(error, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None
