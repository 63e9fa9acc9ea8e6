"""Read an image's format, size and EXIF orientation from its first bytes, without decoding.

Used in the tf.data graph (through tf.numpy_function) as the decompression-bomb guard, and in
Python to explain why an image could not be labeled. It also knows where TensorFlow's decoders
go wrong (palette BMPs, animated WebP, trailing bytes, every-frame GIF decoding) and either
refuses those files with a clear reason or hands TensorFlow bytes it decodes right (`prepare`).

One module per format reads its header (`header(head, file_size) -> (width, height,
orientation, prepare)`); this module sniffs the format and dispatches.
"""
from __future__ import annotations

import dataclasses
import struct

from . import bmp, gif, heif, jpeg, png, tiff, webp
from .base import (
    Bomb,
    ImageError,
    ImageInfo,
    NeedMoreBytes,
    Truncated,
    check_pixels,
)
from .jpeg_structure import (
    MAX_JPEG_PASSES,
    MAX_JPEG_SCANS,
    check_jpeg_structure,
    last_block_tells,
    strict_jpeg_damage,
)
from .sniff import not_an_image, sniff_format

__all__ = [
    "DECODABLE",
    "FORMAT_CODES",
    "HEAD_BYTES",
    "MAX_JPEG_PASSES",
    "MAX_JPEG_SCANS",
    "PILLOW_FORMATS",
    "ImageError",
    "ImageInfo",
    "NeedMoreBytes",
    "check_jpeg_structure",
    "check_size",
    "damage",
    "inspect",
    "last_block_tells",
    "prepare",
    "probe",
    "sniff_format",
    "strict_jpeg_damage",
]

HEAD_BYTES = 65536  # enough for nearly every header; `NeedMoreBytes` asks for the rest

# The formats TensorFlow decodes (each kind its header accepts; the other kinds go to Pillow),
# and the formats only Pillow (+ pillow-heif) decodes.
DECODABLE = ("jpeg", "png", "gif", "bmp", "webp")
PILLOW_FORMATS = ("heif", "avif", "tiff")
# The decoder the reader's graph picks: TensorFlow's for each of DECODABLE, or Pillow's
FORMAT_CODES = {name: i for i, name in enumerate((*DECODABLE, "pillow"))}

_HEADERS = {"jpeg": jpeg.header, "png": png.header, "gif": gif.header, "bmp": bmp.header,
            "webp": webp.header, "heif": heif.header, "avif": heif.header, "tiff": tiff.header}
_NAMES = {"heif": "HEIF", "avif": "AVIF", "tiff": "TIFF"}


def probe(head: bytes, file_size: int | None = None) -> ImageInfo:
    """Format, width, height, orientation from the first bytes; raise ImageError if unusable.

    `file_size` None means `head` is the whole file. If the header runs past `head` and the
    file is longer, raise NeedMoreBytes instead of calling the image damaged.
    """
    if file_size == 0 or not head:
        raise ImageError("empty_file", "the file is empty (0 bytes)")
    fmt = sniff_format(head)
    if fmt is None:
        raise not_an_image(head)
    if fmt == "video":
        raise ImageError("unsupported_format", "not an image: an ISO media file (MP4, "
                         f"QuickTime, 3GP video?) of brand {head[8:12]!r}")
    size = len(head) if file_size is None else file_size
    name = _NAMES.get(fmt, fmt.upper())
    try:
        found = _HEADERS[fmt](head, size)
    except (struct.error, IndexError):
        if len(head) < size:
            raise NeedMoreBytes(fmt) from None
        raise ImageError("corrupt", f"{name} header is truncated: the file ends inside "
                         f"it") from None
    except Bomb as e:
        raise ImageError("too_large", f"{name} is a decompression bomb: {e}") from None
    except Truncated as e:
        raise ImageError("corrupt", f"{name} is truncated: {e} (incomplete download or "
                         f"copy?)") from None
    except ValueError as e:
        raise ImageError("corrupt", f"{name} header is damaged ({e})") from None
    if found.width <= 0 or found.height <= 0:
        raise ImageError("corrupt", f"{name} header gives an invalid size "
                         f"{found.width}x{found.height}")
    return ImageInfo(fmt, found.width, found.height, found.orientation, found.prepare,
                     pillow=found.pillow)


def check_size(info: ImageInfo, max_pixels: int) -> None:
    check_pixels(info.width, info.height, max_pixels)


def inspect(head: bytes, file_size: int, max_pixels: int, tail: bytes | None = None,
            defer_cut_check: bool = False) -> ImageInfo:
    """Every check that needs no decoding: format, size (bomb guard), JPEG structure, the
    framing of a HEIF/AVIF image's coded data.

    `head` is the file's first bytes or all of it; `tail` its last two bytes (None: `head` is
    the whole file). Raise ImageError if the image cannot be labeled, NeedMoreBytes if `head`
    is not enough to tell (a JPEG's structure and HEIF/AVIF coded data are always checked on
    the whole file).
    `defer_cut_check`: where a JPEG only looks cut and its last decoded block tells (see
    `last_block_tells`), return `check_last_block` instead of asking libjpeg here.
    """
    whole = len(head) >= file_size
    info = probe(head, None if whole else file_size)
    check_size(info, max_pixels)
    if info.format == "jpeg":
        if not whole:
            raise NeedMoreBytes("jpeg")
        if check_jpeg_structure(head, defer_cut_check):
            return dataclasses.replace(info, check_last_block=True)
    if info.format in ("heif", "avif"):
        if not whole:
            raise NeedMoreBytes(info.format)
        try:
            heif.check_coded_data(head)
        except (ValueError, struct.error, IndexError) as e:
            raise ImageError("corrupt", f"{_NAMES[info.format]} image data is damaged ({e})",
                             info.width, info.height) from None
    return info


def prepare(data: bytes, info: ImageInfo, max_pixels: int) -> bytes:
    """The bytes TF should decode when `info.prepare`: a GIF's first frame alone, an animated
    WebP flagged RGBA, a BMP without trailing bytes. Raise ImageError if that is impossible."""
    try:
        if info.format == "gif":
            return gif.first_frame(data, max_pixels)
        if info.format == "webp":
            return webp.flagged_rgba(data)
        if info.format == "bmp":
            return bmp.trimmed(data)
    except (struct.error, IndexError):
        raise ImageError("corrupt", f"{info.format.upper()} is truncated: the file ends inside "
                         f"the first frame") from None
    except ValueError as e:
        raise ImageError("corrupt", f"{info.format.upper()} is damaged ({e})") from None
    return data


def damage(data: bytes, info: ImageInfo) -> str | None:
    """A plain reason for a decode failure, where the file's structure shows one."""
    if info.format == "png":
        return png.damage(data)
    if info.format == "webp":
        return webp.damage(data)
    return None
