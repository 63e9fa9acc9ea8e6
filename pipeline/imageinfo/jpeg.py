"""A JPEG's size and EXIF orientation from the markers before its frame header; the frame kinds
libjpeg (so TensorFlow) decodes; 8-bit lossless JPEG goes to Pillow."""
from __future__ import annotations

import struct

from .base import Header, ImageError
from .exif import exif_orientation

SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_LIBJPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC9, 0xCA}  # sequential/progressive, Huffman or arithmetic
_LOSSLESS_SOF = 0xC3  # Huffman lossless: Pillow's libjpeg-turbo decodes it up to 8 bits


def _jpeg_segments(data: bytes):
    """(marker, offset of its length field, length) for each segment up to the frame header."""
    pos = 2
    while True:
        while data[pos] != 0xFF:
            pos += 1  # tolerate junk between segments, as libjpeg does
        while data[pos] == 0xFF:
            pos += 1
        marker = data[pos]
        pos += 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            raise ValueError("end of image before the frame header")
        length = struct.unpack(">H", data[pos:pos + 2])[0]
        if length < 2:
            raise ValueError("bad segment length")
        yield marker, pos, length
        if marker in SOF_MARKERS:
            return
        pos += length


def header(head: bytes, file_size: int) -> Header:
    """Walk the JPEG markers up to the frame header; pick up EXIF orientation on the way (from
    the first EXIF segment, as Pillow's exif_transpose does)."""
    orientation = None
    for marker, pos, length in _jpeg_segments(head):
        if marker == 0xE1 and orientation is None and head[pos + 2:pos + 8] == b"Exif\x00\x00":
            orientation = exif_orientation(head[pos + 8:pos + length])
        if marker in SOF_MARKERS:
            precision, h, w = struct.unpack(">BHH", head[pos + 2:pos + 7])
            if marker == _LOSSLESS_SOF and precision <= 8:
                return Header(w, h, orientation or 1, pillow=True)
            if marker not in _LIBJPEG_SOF:
                kind = f"{precision}-bit lossless" if marker == _LOSSLESS_SOF else "hierarchical"
                raise ImageError("unsupported_format", f"{kind} JPEG (SOF 0x{marker:02X}) is not "
                                 f"supported (neither TensorFlow nor Pillow decodes it); convert "
                                 f"it to PNG", w, h)
            if precision != 8:
                raise ImageError("unsupported_format",
                                 f"{precision}-bit JPEG is not supported (neither TensorFlow nor "
                                 f"Pillow decodes it); convert it to PNG", w, h)
            return Header(w, h, orientation or 1)
    raise ValueError("no frame header")  # unreachable: the walk returns or raises
