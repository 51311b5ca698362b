"""Tier 4: a messy corpus through the whole job; not one row lost.

Good images in every common mode and format, every kind of bad input, and
duplicates, interleaved, from local files and a loopback HTTP server with
fault injection. The manifest carries the expected status and error code of
each row as passthrough columns, so every row checks itself.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.label_images import EXIT_OK, run
from pipelines.output import SUMMARY_FILE
from tests.conftest import read_output
from tests.http_server import FaultServer, serve

pytestmark = pytest.mark.slow


def _photo(size: tuple[int, int] = (96, 72)) -> Image.Image:
    from tests.conftest import real_photo

    image = real_photo("chelsea")
    return image.resize(size)


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def good_images() -> dict[str, bytes]:
    photo = _photo()
    p_transparent = photo.convert("P")
    p_transparent.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [photo, photo.rotate(90), photo.rotate(180)]
    animated_gif = io.BytesIO()
    frames[0].save(animated_gif, format="GIF", save_all=True, append_images=frames[1:])
    animated_webp = io.BytesIO()
    frames[0].save(animated_webp, format="WEBP", save_all=True, append_images=frames[1:])
    images = {
        "rgb.jpg": _encode(photo, "JPEG"),
        "gray.jpg": _encode(photo.convert("L"), "JPEG"),
        "cmyk.jpg": _encode(photo.convert("CMYK"), "JPEG"),
        "exif_rotated.jpg": _encode(photo, "JPEG", exif=exif),
        "rgb.png": _encode(photo, "PNG"),
        "rgba.png": _encode(photo.convert("RGBA"), "PNG"),
        "la.png": _encode(photo.convert("LA"), "PNG"),
        "p_transparent.png": _encode(p_transparent, "PNG"),
        "i16.png": _encode(photo.convert("L").convert("I;16"), "PNG"),
        "bilevel.png": _encode(photo.convert("1"), "PNG"),
        "rgb.webp": _encode(photo, "WEBP"),
        "rgb.bmp": _encode(photo, "BMP"),
        "rgb.tiff": _encode(photo, "TIFF"),
        "animated.gif": animated_gif.getvalue(),
        "animated.webp": animated_webp.getvalue(),
        "png_named.jpg": _encode(photo, "PNG"),  # the extension lies
    }
    with contextlib.suppress(KeyError, OSError, ValueError):  # no AVIF encoder in this build
        images["rgb.avif"] = _encode(photo, "AVIF")
    return images


def bad_images() -> dict[str, tuple[bytes, str, str]]:
    jpeg = _encode(_photo((256, 192)), "JPEG")
    rng = np.random.default_rng(0)
    return {
        "zero.jpg": (b"", "decode_error", "empty_file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "decode_error", "truncated"),
        "corrupt.png": (b"\x89PNG\r\n\x1a\n" + rng.bytes(300), "decode_error", "corrupt"),
        "page.jpg": (
            b"<!DOCTYPE html><html><body>Error</body></html>",
            "decode_error",
            "not_an_image",
        ),
        "drawing.svg": (
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10"/>',
            "decode_error",
            "not_an_image",
        ),
        "notes.txt": (b"just text\n", "decode_error", "not_an_image"),
        "bomb.png": (
            _encode(Image.new("L", (2500, 2500)), "PNG"),
            "decode_error",
            "too_large",
        ),
    }


@pytest.fixture()
def server() -> Iterator[FaultServer]:
    with serve({"web.jpg": _encode(_photo(), "JPEG")}) as srv:
        yield srv


def test_every_row_out_exactly_once_with_its_code(
    tiny_vit: Path, tmp_path: Path, server: FaultServer
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    expected: list[tuple[str, str, str]] = []  # (uri, status, code)
    for name, data in good_images().items():
        (files / name).write_bytes(data)
        expected.append((f"files/{name}", "ok", ""))
    for name, (data, status, code) in bad_images().items():
        (files / name).write_bytes(data)
        expected.append((f"files/{name}", status, code))
    expected += [
        ("files/does-not-exist.jpg", "fetch_error", "not_found"),
        (server.url("/img/web.jpg"), "ok", ""),
        (server.url("/flaky/k/1/web.jpg"), "ok", ""),
        (server.url("/limited/k/web.jpg"), "ok", ""),
        (server.url("/redirect/2/web.jpg"), "ok", ""),
        (server.url("/as-html/web.jpg"), "ok", ""),
        (server.url("/missing"), "fetch_error", "http_404"),
        (server.url("/flaky/forever/99/web.jpg"), "fetch_error", "http_5xx"),
        (server.url("/stall/5/web.jpg"), "fetch_error", "timeout"),
        (server.url("/big/3000000"), "fetch_error", "too_large"),
        (server.url("/truncated/web.jpg"), "fetch_error", "incomplete_download"),
        (server.url("/html-as-jpeg"), "decode_error", "not_an_image"),
        ("", "invalid_input", "empty_uri"),
        ("ftp://example.org/a.jpg", "invalid_input", "unsupported_scheme"),
    ]
    # Interleave duplicates of good and bad rows.
    rows = []
    for i, item in enumerate(expected):
        rows.append(item)
        if i % 4 == 0:
            rows.append(item)
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "row", "expect_status", "expect_code"])
        for i, (uri, status, code) in enumerate(rows):
            writer.writerow([uri, i, status, code])
    out = tmp_path / "out"
    exit_code = run(
        [
            "--input",
            str(manifest),
            "--output",
            str(out),
            "--model",
            str(tiny_vit),
            "--max-image-pixels",
            "4000000",
            "--max-image-bytes",
            "2000000",
            "--fetch-timeout",
            "1",
            "--fetch-retries",
            "1",
            "--batch-size",
            "4",
            "--progress",
            "false",
        ],
        save_main_session=False,
    )
    assert exit_code == EXIT_OK
    table = read_output(out)
    out_rows = table.to_pylist()
    assert len(out_rows) == len(rows)  # the invariant
    assert sorted(r["row"] for r in out_rows) == list(range(len(rows)))
    for r in out_rows:
        got_code = (r["error"] or "").split(":", 1)[0]
        assert (r["status"], got_code) == (r["expect_status"], r["expect_code"] or ""), r
        if r["status"] == "ok":
            assert r["label"] and len(r["labels"]) == 5
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rows_in"] == summary["rows_out"] == len(rows)
    for code_name, count in summary["errors_by_code"].items():
        assert count == sum(1 for r in out_rows if (r["error"] or "").startswith(code_name + ":"))
