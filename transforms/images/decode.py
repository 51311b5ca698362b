"""Decoding image bytes with Pillow into an upright RGB image, or an error code."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from transforms.errors import ErrorCode, RowError, Status

#: Default decompression-bomb limit, in pixels (Pillow's own default is ~89 MP).
DEFAULT_MAX_PIXELS = 178_956_970

# Fail on truncated files instead of silently padding them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's own pixel limit (a warning past ~89.5 MP, an error past twice that)
# would override --max-image-pixels in both directions: images between 89.5 and
# 179 MP were refused by default, and raising the limit had no effect.
# `decode_image` checks the configured limit itself, from the header, before
# any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None

try:  # HEIC/HEIF when the optional plugin is installed (AVIF is built into Pillow 11.3+)
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:
    pass


@dataclass(frozen=True, kw_only=True)
class DecodeOptions:
    """How images are decoded: built by `LabelingSpec.decode`, where every option
    has its default, check and help text (`LabelingSpec().decode` for defaults).

    Attributes:
        max_pixels: decompression-bomb limit.
        fast: decode large JPEGs at reduced scale (see `decode_image`). Off by
            default: the pixels then differ from what `transformers.pipeline`
            decodes, and so can labels.
        threads: images decoded and preprocessed at once per worker process;
            None for one per core the process may use, at most 8
            (`decode_threads`).
        tune_malloc: apply `transforms.allocator.tune_malloc` in the worker.
    """

    max_pixels: int
    fast: bool
    threads: int | None
    tune_malloc: bool  # see transforms.allocator

    @property
    def decode_threads(self) -> int:
        """`threads`, or one per core this process may run on, at most
        `MAX_DEFAULT_DECODE_THREADS`."""
        if self.threads:
            return self.threads
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not on Linux
            cores = os.cpu_count() or 1
        return min(cores, MAX_DEFAULT_DECODE_THREADS)


#: The default decode threads per process on a large machine. Each decode
#: thread holds the GIL for part of every image (about a third of the work on
#: a 500x375 photo), so past a few threads a process decodes no faster, while
#: each thread grows its own malloc arena of decode buffers.
MAX_DEFAULT_DECODE_THREADS = 8


def decode_image(
    data: bytes, *, draft_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode bytes into an RGB image, the way transformers' `load_image` does.

    EXIF orientation is applied, then the image is converted to RGB. For JPEG,
    when `draft_side` is given, the decoder's draft mode decodes at a reduced
    scale (1/2, 1/4 or 1/8) that stays at least `draft_side` pixels on both
    sides: a 3000x2000 photo for a 224 px model decodes about 8x faster.

    Args:
        data: the encoded image.
        draft_side: smallest side to keep when decoding JPEG in draft mode;
            None decodes at full size.
        max_pixels: images with more pixels than this are refused as
            decompression bombs, before any pixel is decoded.

    Raises:
        RowError: with a decode error code; never anything else.
    """
    if not data:
        raise RowError(ErrorCode.EMPTY_FILE, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise RowError(
                    ErrorCode.TOO_LARGE,
                    f"{width}x{height} pixels is over the --max-image-pixels limit of {max_pixels}",
                    status=Status.DECODE_ERROR,
                )
            if draft_side and isinstance(image, ImageFile.ImageFile) and image.format == "JPEG":
                image.draft("RGB", (draft_side, draft_side))
            image.load()
            # As transformers' load_image: EXIF orientation, then RGB. In place and
            # only when needed: both would otherwise copy every full-size image
            # (about 3% of a MobileNetV2 job's CPU time), for the same pixels.
            ImageOps.exif_transpose(image, in_place=True)
            return image if image.mode == "RGB" else image.convert("RGB")
    except RowError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RowError(ErrorCode.DECOMPRESSION_BOMB, str(e)) from e
    except UnidentifiedImageError as e:
        magic = image_magic(data)
        if magic:  # an image format's signature, but Pillow cannot parse the rest
            raise RowError(ErrorCode.CORRUPT, f"{magic} signature, but the data is corrupt") from e
        raise RowError(ErrorCode.NOT_AN_IMAGE, f"not a recognised image ({_sniff(data)})") from e
    except (OSError, SyntaxError, EOFError) as e:
        message = str(e)
        lowered = message.lower()
        if "truncated" in lowered or "broken data stream" in lowered or isinstance(e, EOFError):
            raise RowError(ErrorCode.TRUNCATED, message) from e
        # The format was recognised but its data does not parse.
        raise RowError(ErrorCode.CORRUPT, f"{type(e).__name__}: {message}") from e
    except Exception as e:  # a codec bug must not take the job down
        raise RowError(ErrorCode.DECODE_FAILED, f"{type(e).__name__}: {e}") from e


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def image_magic(data: bytes) -> str | None:
    """The image format whose signature `data` starts with, if any."""
    for prefix, name in _MAGIC:
        if data.startswith(prefix):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"avif", b"mif1"):
        return "HEIF/AVIF"
    return None


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "looks like HTML"
    if head.startswith(b"<?xml") or b"<svg" in head:
        return "looks like XML/SVG"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in data[:256]):
        return "looks like text"
    # Never the bytes themselves: error rows and logs must not leak file contents.
    return f"{len(data)} bytes of an unknown format"
