"""A BMP's size, whether TensorFlow decodes its kind right, and its pixels without trailing bytes."""
from __future__ import annotations

import struct

from .base import ImageError

_BMP_COMPRESSION = {1: "RLE8", 2: "RLE4", 3: "BITFIELDS", 4: "JPEG", 5: "PNG", 6: "ALPHABITFIELDS"}
_BMP_STANDARD_MASKS = (0x00FF0000, 0x0000FF00, 0x000000FF)


def header(head: bytes, file_size: int) -> tuple[int, int, int, bool]:
    """TF decodes 24/32-bit BGR(A) and reads 8-bit pixels as gray, ignoring the palette; it
    requires the file to end right after the pixels. Refuse what it would decode wrong."""
    (header_size,) = struct.unpack("<I", head[14:18])
    if header_size < 40:
        raise ImageError("unsupported_format", "OS/2 BMP (12-byte header) is not supported; "
                         "convert it to PNG")
    pixels_at, = struct.unpack("<I", head[10:14])
    w, h, _, bpp, compression = struct.unpack("<iiHHI", head[18:34])
    if not _tf_decodes_bmp(head, header_size, bpp, compression):
        how = _BMP_COMPRESSION.get(compression, "palette" if bpp <= 8 else "uncompressed")
        raise ImageError("unsupported_format",
                         f"{bpp}-bit {how} BMP is not supported (TensorFlow decodes 24/32-bit "
                         f"and 8-bit grayscale BMP); convert it to PNG", w, abs(h))
    expected = pixels_at + (w * (bpp // 8) + 3) // 4 * 4 * abs(h)
    if 0 < w and file_size < expected:
        raise ImageError("corrupt", f"BMP is truncated: {expected - file_size} bytes of pixel "
                         f"data are missing")
    return w, abs(h), 1, file_size > expected  # trailing bytes: TF refuses them, so trim


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
