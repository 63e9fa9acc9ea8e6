"""A BMP's size, whether TensorFlow decodes its kind right (else Pillow does), and its pixels
without trailing bytes."""
from __future__ import annotations

import struct

from .base import Header, ImageError

_BMP_COMPRESSION = {1: "RLE8", 2: "RLE4", 3: "BITFIELDS", 4: "JPEG", 5: "PNG", 6: "ALPHABITFIELDS"}
_BMP_STANDARD_MASKS = (0x00FF0000, 0x0000FF00, 0x000000FF)
_EMBEDDED = (4, 5)  # BI_JPEG, BI_PNG


def header(head: bytes, file_size: int) -> Header:
    """TF decodes 24/32-bit BGR(A) and reads 8-bit pixels as gray, ignoring the palette; it
    requires the file to end right after the pixels. What it would decode wrong (palette,
    1/4/16-bit, RLE, bitfields, OS/2 headers) goes to Pillow; JPEG/PNG inside a BMP is refused."""
    (header_size,) = struct.unpack("<I", head[14:18])
    if header_size < 40:  # OS/2 1.x: 16-bit sizes
        w, h = struct.unpack("<HH", head[18:22])
        return Header(w, h, pillow=True)
    pixels_at, = struct.unpack("<I", head[10:14])
    w, h, _, bpp, compression = struct.unpack("<iiHHI", head[18:34])
    if compression in _EMBEDDED:
        raise ImageError("unsupported_format",
                         f"BMP holding a {_BMP_COMPRESSION[compression]} image is not supported "
                         f"(neither TensorFlow nor Pillow decodes it); convert it to PNG", w, abs(h))
    if not _tf_decodes_bmp(head, header_size, bpp, compression):
        return Header(w, abs(h), pillow=True)
    expected = pixels_at + (w * (bpp // 8) + 3) // 4 * 4 * abs(h)
    if 0 < w and file_size < expected:
        raise ImageError("corrupt", f"BMP is truncated: {expected - file_size} bytes of pixel "
                         f"data are missing")
    return Header(w, abs(h), prepare=file_size > expected)  # trailing bytes: TF refuses them


def _tf_decodes_bmp(head: bytes, header_size: int, bpp: int, compression: int) -> bool:
    if compression == 0:
        if bpp in (24, 32):
            return True
        if bpp == 8:
            return _gray_palette(head, header_size)
        return False
    if compression in (3, 6) and bpp == 32:
        return struct.unpack("<III", head[54:66]) == _BMP_STANDARD_MASKS
    return False


def _gray_palette(head: bytes, header_size: int) -> bool:
    (used,) = struct.unpack("<I", head[46:50])
    start = 14 + header_size
    table = head[start:start + 4 * (used or 256)]
    if len(table) < 4 * (used or 256):
        raise IndexError("palette is cut off")
    return all(table[4 * i:4 * i + 3] == bytes((i, i, i)) for i in range(used or 256))


def trimmed(data: bytes) -> bytes:
    pixels_at, = struct.unpack("<I", data[10:14])
    w, h, _, bpp = struct.unpack("<iiHH", data[18:30])
    return data[:pixels_at + (w * (bpp // 8) + 3) // 4 * 4 * abs(h)]
