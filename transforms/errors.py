"""Errors as data: every failure becomes a row with a `status` and an `error`.

The `error` column always starts with a stable code from `ErrorCode`, followed by
": " and a human-readable message, e.g. ``"not_found: /data/cat.jpg"``. Code is
what dashboards and `summary.json` count; the message is for people.
"""

from __future__ import annotations

import re
from enum import Enum
from urllib.parse import urlsplit, urlunsplit


class Status(str, Enum):
    """Value of the `status` column of every output row."""

    OK = "ok"
    FETCH_ERROR = "fetch_error"
    DECODE_ERROR = "decode_error"
    INFERENCE_ERROR = "inference_error"
    INVALID_INPUT = "invalid_input"


class ErrorCode(str, Enum):
    """Stable error codes. Documented in the README; never rename one."""

    # invalid_input
    EMPTY_URI = "empty_uri"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    MALFORMED_ROW = "malformed_row"
    UNSUPPORTED_ELEMENT = "unsupported_element"
    BAD_ENCODING = "bad_encoding"
    LINE_TOO_LONG = "line_too_long"
    BAD_PATH = "bad_path"
    NO_IMAGE = "no_image"
    # fetch_error
    NOT_FOUND = "not_found"
    PERMISSION_DENIED = "permission_denied"
    HTTP_404 = "http_404"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    TIMEOUT = "timeout"
    CONNECTION = "connection_error"
    TOO_LARGE = "too_large"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    INCOMPLETE_DOWNLOAD = "incomplete_download"
    FETCH_FAILED = "fetch_failed"
    IS_DIRECTORY = "is_directory"
    IS_FIFO = "is_fifo"
    IS_DEVICE = "is_device"
    IS_SOCKET = "is_socket"
    NOT_A_FILE = "not_a_file"
    SYMLINK_LOOP = "symlink_loop"
    READ_ERROR = "read_error"
    BLOCKED_ADDRESS = "blocked_address"
    # decode_error
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    DECOMPRESSION_BOMB = "decompression_bomb"
    DECODE_FAILED = "decode_failed"
    BAD_SHARD = "bad_shard"
    # inference_error
    INFERENCE_FAILED = "inference_failed"


_STATUS_OF_CODE: dict[ErrorCode, Status] = {
    ErrorCode.EMPTY_URI: Status.INVALID_INPUT,
    ErrorCode.UNSUPPORTED_SCHEME: Status.INVALID_INPUT,
    ErrorCode.MALFORMED_ROW: Status.INVALID_INPUT,
    ErrorCode.UNSUPPORTED_ELEMENT: Status.INVALID_INPUT,
    ErrorCode.BAD_ENCODING: Status.INVALID_INPUT,
    ErrorCode.LINE_TOO_LONG: Status.INVALID_INPUT,
    ErrorCode.BAD_PATH: Status.INVALID_INPUT,
    ErrorCode.NO_IMAGE: Status.INVALID_INPUT,
    ErrorCode.BAD_SHARD: Status.DECODE_ERROR,
    ErrorCode.EMPTY_FILE: Status.DECODE_ERROR,
    ErrorCode.NOT_AN_IMAGE: Status.DECODE_ERROR,
    ErrorCode.TRUNCATED: Status.DECODE_ERROR,
    ErrorCode.CORRUPT: Status.DECODE_ERROR,
    ErrorCode.DECOMPRESSION_BOMB: Status.DECODE_ERROR,
    ErrorCode.DECODE_FAILED: Status.DECODE_ERROR,
    ErrorCode.INFERENCE_FAILED: Status.INFERENCE_ERROR,
}


def status_of(code: ErrorCode) -> Status:
    """The row status an error code belongs to (fetch errors by default)."""
    return _STATUS_OF_CODE.get(code, Status.FETCH_ERROR)


class RowError(Exception):
    """A failure of one row, carried as data rather than raised out of a DoFn.

    Picklable (it travels between Beam workers) and comparable by value.
    """

    def __init__(self, code: ErrorCode, message: str, status: Status | None = None) -> None:
        super().__init__(code, message)
        self.code = ErrorCode(code)
        self.message = message
        self._status = Status(status) if status is not None else None

    def __reduce__(self) -> tuple[type, tuple[ErrorCode, str, Status | None]]:
        return (type(self), (self.code, self.message, self._status))

    @property
    def status(self) -> Status:
        """The code's status, unless the raiser knew better (an image over the pixel
        limit is `too_large` like a download over the byte limit, but a decode error)."""
        return self._status or status_of(self.code)

    def __str__(self) -> str:
        return format_error(self.code, self.message)

    def __repr__(self) -> str:
        return f"RowError({self.code.value!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowError) and (self.code, self.message) == (
            other.code,
            other.message,
        )

    def __hash__(self) -> int:
        return hash((self.code, self.message))


def format_error(code: ErrorCode, message: str) -> str:
    """Render the `error` column: ``"<code>: <message>"``, with URIs redacted."""
    message = redact(" ".join(message.split()))
    if len(message) > 500:
        message = message[:497] + "..."
    return f"{code.value}: {message}" if message else code.value


_URL_RE = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+)")


def redact_uri(uri: str) -> str:
    """Drop the query string and any user:password of a URI.

    Signed URLs (GCS V4, S3 presigned) carry their credentials in the query string;
    they must never reach logs, error rows or summary.json.
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if not parts.scheme or parts.scheme == "file":
        return uri
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact(text: str) -> str:
    """Redact every URL found inside free text (exception messages included)."""
    return _URL_RE.sub(lambda m: redact_uri(m.group(1)), text)
