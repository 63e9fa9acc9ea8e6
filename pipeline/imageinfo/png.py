"""A PNG's size from its IHDR chunk."""
from __future__ import annotations

import struct

from .base import Header


def header(head: bytes, file_size: int) -> Header:
    if head[12:16] != b"IHDR":
        raise ValueError("missing IHDR chunk")
    w, h = struct.unpack(">II", head[16:24])
    return Header(w, h)


def damage(data: bytes) -> str | None:
    if b"IEND" not in data[-4096:]:
        return "PNG is truncated: the file ends before the IEND chunk"
    return None
