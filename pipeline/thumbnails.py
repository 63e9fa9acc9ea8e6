"""Small JPEG thumbnails of source images (local paths or s3:// URIs) for the HTML report.

Pillow, not TensorFlow (the report starts in a fraction of a second). A source is read and
checked with the reader's limits before anything is decoded: at most --max-file-bytes are read
(a ranged GET on S3), the header's size must be within --max-pixels, and a JPEG is decoded at a
reduced scale (Pillow's draft mode). Whatever fails becomes a `Thumbnail` with no bytes and a
reason, which the page shows as a placeholder.
"""
from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

from . import imageinfo, inputs, pillow_decode
from .imageinfo import ImageError
from .types import ReadLimits, S3Options

# Decoding waits on S3 or the disk as much as on a core; a few at once. Each may hold up to
# max_pixels x 3 bytes of a PNG being decoded, so not many more.
WORKERS = 4
JPEG_QUALITY = 80


@dataclass(frozen=True)
class Thumbnail:
    uri: str
    jpeg: bytes | None  # None: no preview, see `kind` (an error_kind) and `reason`
    kind: str = ""
    reason: str = ""


def make_all(uris: Iterable[str], size: int, limits: ReadLimits, s3: S3Options) -> dict[str, Thumbnail]:
    """uri -> Thumbnail for each distinct uri, made on a few threads."""
    from PIL import Image

    # Our own pixel check runs first; Pillow's warning would only repeat it on stderr.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    wanted = list(dict.fromkeys(uris))
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="thumbnail") as pool:
        made = pool.map(lambda uri: make(uri, size, limits, s3), wanted)
        return {t.uri: t for t in made}


def make(uri: str, size: int, limits: ReadLimits, s3: S3Options) -> Thumbnail:
    """One thumbnail (longest side `size`), or the reason there is none. Never raises for a
    bad source."""
    try:
        return Thumbnail(uri, _jpeg_thumbnail(_read_source(uri, limits, s3), size, limits))
    except ImageError as e:
        return Thumbnail(uri, None, e.kind, str(e))
    except Exception as e:  # noqa: BLE001 -- a hostile file must cost a placeholder, not the report
        return Thumbnail(uri, None, "unreadable", f"cannot be shown ({type(e).__name__}: {e})")


def _read_source(uri: str, limits: ReadLimits, s3: S3Options) -> bytes:
    limit = limits.max_file_bytes
    try:
        data = inputs.open_input(uri, s3).read(limit + 1)  # S3: a ranged GET
    except OSError as e:  # S3 still failing after its retries (a local read explains itself)
        raise ImageError("unreadable", f"cannot read {uri}: {e}") from None
    if len(data) > limit:
        raise ImageError("too_large", f"the file is above --max-file-bytes {limit}")
    if not data:
        raise ImageError("empty_file", "the file is empty (0 bytes)")
    return data


def _jpeg_thumbnail(data: bytes, size: int, limits: ReadLimits) -> bytes:
    from PIL import Image, ImageOps

    info = imageinfo.probe(data)  # format and size from the header: nothing decoded yet
    imageinfo.check_size(info, limits.max_pixels)
    if info.pillow:  # HEIF, AVIF, TIFF, ...: the reader's second decoder
        upright = _upright(*pillow_decode.decode(data, info.format, limits.max_pixels))
        upright.thumbnail((size, size))
        return _jpeg(upright)
    image: Image.Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > limits.max_pixels:  # a header Pillow reads otherwise
                raise ImageError("too_large", f"{image.width}x{image.height} is above --max-pixels")
            image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError("corrupt", f"{info.format.upper()} cannot be decoded: {e}") from None
    return _jpeg(image)


def _upright(pixels, orientation: int):
    from PIL import Image, ImageOps

    image = Image.fromarray(pixels)
    image.getexif()[0x0112] = orientation
    return ImageOps.exif_transpose(image)


def _jpeg(image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def file_name(uri: str) -> str:
    """A stable file name for `uri`'s thumbnail when thumbnails are written beside the page."""
    import hashlib

    return hashlib.sha256(os.fsencode(uri)).hexdigest()[:20] + ".jpg"
