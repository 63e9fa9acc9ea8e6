"""Read an image's format, size and EXIF orientation from its first bytes, without decoding.

Used in the tf.data graph (through tf.numpy_function) as the decompression-bomb guard, and in
Python to explain why an image could not be labeled.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

HEAD_BYTES = 65536  # JPEG APP1 (EXIF) segments are at most 64 KiB and come first

# The formats TensorFlow decodes; the others are recognised only to name them in errors.
DECODABLE = ("jpeg", "png", "gif", "bmp", "webp")
FORMAT_CODES = {name: i for i, name in enumerate(DECODABLE)}


class ImageError(Exception):
    """Why an image cannot be labeled: `kind` is machine-readable, str(self) is for people."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    orientation: int = 1  # EXIF orientation tag, 1..8


def sniff_format(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "avif" if brand in (b"avif", b"avis") else "heif"
    return None


def _not_an_image(head: bytes) -> ImageError:
    text = head[:512].lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return ImageError("unsupported_format", "not an image: the file is an HTML/XML document")
    if text and all(32 <= c < 127 or c in (9, 10, 13) for c in text[:256]):
        return ImageError("unsupported_format", "not an image: the file is plain text")
    return ImageError("unsupported_format", "not an image: unknown file signature")


def probe(head: bytes, file_size: int | None = None) -> ImageInfo:
    """Format, width, height, orientation from the first bytes; raise ImageError if unusable."""
    if file_size == 0 or not head:
        raise ImageError("empty_file", "the file is empty (0 bytes)")
    fmt = sniff_format(head)
    if fmt is None:
        raise _not_an_image(head)
    if fmt not in DECODABLE:
        raise ImageError("unsupported_format", f"{fmt.upper()} images are not supported")
    try:
        width, height, orientation = _PARSERS[fmt](head)
    except (struct.error, IndexError, ValueError) as e:
        raise ImageError("corrupt", f"{fmt.upper()} header is damaged or truncated ({e})") from None
    if width <= 0 or height <= 0:
        raise ImageError("corrupt", f"{fmt.upper()} header gives an invalid size {width}x{height}")
    return ImageInfo(fmt, width, height, orientation)


def check_size(info: ImageInfo, max_pixels: int) -> None:
    if info.width * info.height > max_pixels:
        raise ImageError(
            "too_large",
            f"{info.width}x{info.height} = {info.width * info.height / 1e6:.1f} megapixels is above "
            f"--max-pixels {max_pixels / 1e6:.1f} megapixels",
        )


def _png(head: bytes) -> tuple[int, int, int]:
    if head[12:16] != b"IHDR":
        raise ValueError("missing IHDR chunk")
    w, h = struct.unpack(">II", head[16:24])
    return w, h, 1


def _gif(head: bytes) -> tuple[int, int, int]:
    w, h = struct.unpack("<HH", head[6:10])
    return w, h, 1


def _bmp(head: bytes) -> tuple[int, int, int]:
    header_size = struct.unpack("<I", head[14:18])[0]
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        w, h = struct.unpack("<HH", head[18:22])
    else:
        w, h = struct.unpack("<ii", head[18:26])
    return w, abs(h), 1


def _webp(head: bytes) -> tuple[int, int, int]:
    chunk = head[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
    elif chunk == b"VP8 ":
        if head[23:26] != b"\x9d\x01\x2a":
            raise ValueError("bad VP8 start code")
        w, h = struct.unpack("<HH", head[26:30])
        w, h = w & 0x3FFF, h & 0x3FFF
    elif chunk == b"VP8L":
        if head[20] != 0x2F:
            raise ValueError("bad VP8L signature")
        bits = int.from_bytes(head[21:25], "little")
        w, h = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:
        raise ValueError(f"unknown WebP chunk {chunk!r}")
    return w, h, 1


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(head: bytes) -> tuple[int, int, int]:
    """Walk the JPEG markers up to the frame header; pick up EXIF orientation on the way."""
    pos, orientation = 2, 1
    while True:
        while head[pos] != 0xFF:
            pos += 1  # tolerate junk between segments, as libjpeg does
        while head[pos] == 0xFF:
            pos += 1
        marker = head[pos]
        pos += 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            raise ValueError("end of image before the frame header")
        length = struct.unpack(">H", head[pos:pos + 2])[0]
        if length < 2:
            raise ValueError("bad segment length")
        if marker in _SOF_MARKERS:
            h, w = struct.unpack(">HH", head[pos + 3:pos + 7])
            return w, h, orientation
        if marker == 0xE1 and head[pos + 2:pos + 8] == b"Exif\x00\x00":
            orientation = _exif_orientation(head[pos + 8:pos + length])
        pos += length


def _exif_orientation(tiff: bytes) -> int:
    try:
        endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
        ifd = struct.unpack(endian + "I", tiff[4:8])[0]
        (count,) = struct.unpack(endian + "H", tiff[ifd:ifd + 2])
        for i in range(count):
            entry = tiff[ifd + 2 + 12 * i: ifd + 14 + 12 * i]
            tag, typ = struct.unpack(endian + "HH", entry[:4])
            if tag == 0x0112 and typ == 3:
                value = struct.unpack(endian + "H", entry[8:10])[0]
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error, IndexError):
        pass  # a broken EXIF block is ignored, as image viewers do
    return 1


_PARSERS = {"jpeg": _jpeg, "png": _png, "gif": _gif, "bmp": _bmp, "webp": _webp}
