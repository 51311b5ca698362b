"""The address guard: which hosts an http(s) fetch may connect to.

Link-local addresses and cloud metadata endpoints are always refused: a
manifest must never make a worker read its own credentials. With
`--block-private-networks`, loopback and private addresses are refused too
(untrusted manifests). Names are checked before any lookup, and every address
a name resolves to is checked before aiohttp connects to it (`guarded_resolver`),
so a DNS answer cannot point a fetch at a blocked address.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from transforms.errors import ErrorCode, RowError, redact_uri

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


def guarded_resolver(block_private: bool) -> Any:
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
