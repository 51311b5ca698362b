"""Tier 4: the SSRF guard, in a network namespace of its own.

The fetches run in a subprocess under `unshare -n` with only loopback up, and a
stubbed resolver that maps test names to metadata, private and loopback
addresses. A fetcher without the guard would try to connect to 169.254.169.254
or 10.1.2.3, fail with `connection_error` (no route: no packet leaves the
namespace), and so fail these tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare -n as root"
)

SCRIPT = r"""
import io, json, socket, sys
from urllib.parse import quote
from PIL import Image
from tests.http_server import serve
from tests.conftest import default_fetch
from transforms.errors import RowError
from transforms.images.fetch import Fetcher, FetchOptions

NAMES = {
    "metadata.test": "169.254.169.254",
    "metadata.google.internal": "169.254.169.254",
    "private.test": "10.1.2.3",
    "loop.test": "127.0.0.1",
    "v6meta.test": "fd00:ec2::254",
}
real = socket.getaddrinfo

def fake(host, *args, **kwargs):
    return real(NAMES.get(host, host), *args, **kwargs)

socket.getaddrinfo = fake
buf = io.BytesIO()
Image.new("RGB", (8, 8)).save(buf, format="JPEG")
results = {}
with serve({"cat.jpg": buf.getvalue()}) as server:
    port = server.server_address[1]
    cases = {
        "loopback_default": (f"http://loop.test:{port}/img/cat.jpg", False),
        "literal_metadata": ("http://169.254.169.254/computeMetadata/v1/", False),
        "named_metadata": ("http://metadata.google.internal/computeMetadata/v1/", False),
        "resolved_metadata": ("http://metadata.test/latest/meta-data/", False),
        "resolved_v6_metadata": ("http://v6meta.test/latest/", False),
        "link_local_v6": ("http://[fe80::1]/x.jpg", False),
        "mapped_v6": ("http://[::ffff:169.254.169.254]/x.jpg", False),
        "redirect_to_metadata": (
            f"http://loop.test:{port}/redirect-to/" + quote("http://169.254.169.254/x", safe=""),
            False,
        ),
        "redirect_to_named": (
            f"http://loop.test:{port}/redirect-to/" + quote("http://metadata.test/x", safe=""),
            False,
        ),
        "private_default": ("http://private.test/x.jpg", False),
        "private_blocked": ("http://private.test/x.jpg", True),
        "loopback_blocked": (f"http://loop.test:{port}/img/cat.jpg", True),
        "literal_private_blocked": ("http://192.168.1.1/x.jpg", True),
    }
    for name, (url, block) in cases.items():
        fetcher = Fetcher(default_fetch(retries=2, backoff_s=0.01, timeout_s=3,
                                       block_private_networks=block))
        try:
            fetcher.fetch(url)
            results[name] = "ok"
        except RowError as e:
            results[name] = e.code.value
        finally:
            fetcher.close()
    results["hits"] = sum(server.hits.values())
print("RESULTS", json.dumps(results))
"""


def test_address_guard_in_a_private_network_namespace() -> None:
    proc = subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            f'ip link set lo up && exec "{sys.executable}" -c "$0"',
            SCRIPT,
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    assert results.pop("loopback_default") == "ok"  # loopback stays allowed by default
    # Not blocked by default, so it was tried: the namespace has no route there.
    assert results.pop("private_default") == "connection_error"
    hits = results.pop("hits")
    assert hits == 3  # the loopback fetch and the two redirects; nothing else reached it
    assert results == {name: "blocked_address" for name in results}, results
