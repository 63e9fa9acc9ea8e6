"""A WebP's size and animation flag, and the flag fix TensorFlow needs for animated files."""
from __future__ import annotations

import struct

from .base import Header

_VP8X_ANIMATION, _VP8X_ALPHA = 0x02, 0x10


def header(head: bytes, file_size: int) -> Header:
    chunk = head[12:16]
    animated = False
    if chunk == b"VP8X":
        animated = bool(head[20] & _VP8X_ANIMATION)
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
    return Header(w, h, prepare=animated)


def flagged_rgba(data: bytes) -> bytes:
    """TF 2.21 decodes an animated WebP as RGBA but shapes it by the alpha flag: without the
    flag the bytes come out as scrambled RGB. Setting the flag gives the true first frame."""
    return data[:20] + bytes([data[20] | _VP8X_ALPHA]) + data[21:]


def damage(data: bytes) -> str | None:
    expected = struct.unpack("<I", data[4:8])[0] + 8
    if len(data) < expected:
        return f"WebP is truncated: {expected - len(data)} of its {expected} bytes are missing"
    return None
