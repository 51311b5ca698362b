"""A loopback HTTP server with fault injection, for fetch tests and the fetch benchmark.

Routes (GET):
    /img/<name>                 the registered image bytes
    /missing                    404 every time
    /forbidden                  403 every time
    /flaky/<key>/<n>/<name>     500 for the first n requests of <key>, then the image
    /limited/<key>/<name>       429 with Retry-After: 1 the first time, then the image
    /stall/<seconds>/<name>     waits, then the image
    /truncated/<name>           Content-Length of the whole image, sends half, closes
    /redirect/<n>/<name>        a chain of n 302 redirects, then the image
    /redirect-to/<url>          one 302 redirect to the percent-encoded <url>
    /as-html/<name>             the image with Content-Type text/html
    /html-as-jpeg               an HTML error page served as image/jpeg
    /big/<bytes>                a body of that many bytes, with Content-Length
    /big-chunked/<bytes>        a body of that many bytes, chunked (no length)

Every response can be delayed by `latency_s`. `hits` counts requests per path.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FaultServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, images: dict[str, bytes], latency_s: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.images = images
        self.latency_s = latency_s
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that give up (timeouts, byte caps) close early; that is expected."""
        return

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path


class _Handler(BaseHTTPRequestHandler):
    server: FaultServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle and
    # delayed ACKs add ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "image/jpeg",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _image(self, name: str, content_type: str = "image/jpeg") -> None:
        body = self.server.images.get(name)
        if body is None:
            self._send(404, b"no such image", "text/plain")
        else:
            self._send(200, body, content_type)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.hits[path] += 1
        if self.server.latency_s:
            time.sleep(self.server.latency_s)
        parts = path.strip("/").split("/")
        route, args = parts[0], parts[1:]
        if route == "img":
            self._image(args[0])
        elif route == "missing":
            self._send(404, b"<html>Not Found</html>", "text/html")
        elif route == "forbidden":
            self._send(403, b"<html>Forbidden</html>", "text/html")
        elif route == "flaky":
            key, failures, name = args
            with self.server.lock:
                self.server.hits["flaky:" + key] += 1
                count = self.server.hits["flaky:" + key]
            if count <= int(failures):
                self._send(500, b"<html>Internal Server Error</html>", "text/html")
            else:
                self._image(name)
        elif route == "limited":
            key, name = args
            with self.server.lock:
                self.server.hits["limited:" + key] += 1
                count = self.server.hits["limited:" + key]
            if count == 1:
                self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
            else:
                self._image(name)
        elif route == "stall":
            time.sleep(float(args[0]))
            self._image(args[1])
        elif route == "truncated":
            body = self.server.images[args[0]]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif route == "redirect":
            remaining, name = int(args[0]), args[1]
            if remaining == 0:
                self._image(name)
            else:
                self._send(
                    302, b"", "text/plain", {"Location": f"/redirect/{remaining - 1}/{name}"}
                )
        elif route == "redirect-to":  # /redirect-to/<url, percent-encoded>
            from urllib.parse import unquote

            self._send(302, b"", "text/plain", {"Location": unquote(args[0])})
        elif route == "as-html":
            self._image(args[0], "text/html")
        elif route == "html-as-jpeg":
            self._send(200, b"<!DOCTYPE html><html><body>Oops</body></html>", "image/jpeg")
        elif route == "big":
            self._send(200, b"\0" * int(args[0]), "image/jpeg")
        elif route == "big-chunked":
            size = int(args[0])
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"\0" * 65536
            sent = 0
            try:
                while sent < size:
                    part = chunk[: min(len(chunk), size - sent)]
                    self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    sent += len(part)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
        else:
            self._send(404, b"unknown route", "text/plain")


@contextmanager
def serve(images: dict[str, bytes], latency_s: float = 0.0) -> Iterator[FaultServer]:
    """Run a `FaultServer` in a background thread for the duration of the block."""
    server = FaultServer(images, latency_s)
    # A short poll interval: shutdown() waits up to one interval (0.5 s by default).
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _serve_forever(images: dict[str, bytes], latency_s: float, port_queue: Any) -> None:
    server = FaultServer(images, latency_s)
    port_queue.put(server.server_address[1])
    server.serve_forever()


@contextmanager
def serve_in_subprocess(images: dict[str, bytes], latency_s: float = 0.0) -> Iterator[str]:
    """Run a `FaultServer` in its own process (so it does not share our GIL).

    Yields the base URL.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_serve_forever, args=(images, latency_s, queue), daemon=True)
    process.start()
    try:
        port = queue.get(timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.join(timeout=10)
