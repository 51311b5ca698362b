"""URIs and paths: the one place that reads a scheme off a string.

A plain path (``photos/cat.jpg``, ``/data/cat.jpg``) has the scheme ``file``;
everything else is ``<scheme>://...``, with the scheme compared lower-case.
"""

from __future__ import annotations

import posixpath


def scheme_of(uri: str) -> str:
    """The URI scheme, lower-case; ``file`` for plain paths."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def has_scheme(uri: str) -> bool:
    """Written as ``<scheme>://...`` (``file://`` included), not as a plain path."""
    return "://" in uri


def is_remote(uri: str) -> bool:
    """Not on this machine's file system: a scheme other than ``file``."""
    return scheme_of(uri) != "file"


def strip_file_scheme(uri: str) -> str:
    """``file:///data/x`` as the plain path ``/data/x``; other URIs unchanged."""
    return uri[len("file://") :] if scheme_of(uri) == "file" and has_scheme(uri) else uri


def with_protocol(original: str, found: str) -> str:
    """fsspec globs drop the protocol of remote paths; put `original`'s back."""
    scheme = scheme_of(original)
    if scheme == "file" or has_scheme(found):
        return found
    return f"{scheme}://{found}"


def parent(uri: str) -> str:
    """The folder a path or URI is in."""
    return posixpath.dirname(uri)


def resolve_uri(uri: str, base_dir: str) -> str:
    """Resolve a manifest entry against the manifest's folder.

    Absolute paths and URIs with a scheme are returned as they are.
    """
    if has_scheme(uri) or uri.startswith("/") or not uri:
        return uri
    if has_scheme(base_dir):
        return posixpath.join(base_dir, uri)
    return posixpath.normpath(posixpath.join(base_dir, uri))
