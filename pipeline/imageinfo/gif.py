"""A GIF's size, and its first frame alone for TensorFlow (which decodes every frame)."""
from __future__ import annotations

import struct

from .base import Header, check_pixels


def header(head: bytes, file_size: int) -> Header:
    # TF decodes every frame of a GIF (memory!) even when asked for the first: always prepare.
    w, h = struct.unpack("<HH", head[6:10])
    return Header(w, h, prepare=True)


def first_frame(data: bytes, max_pixels: int) -> bytes:
    """The GIF cut after its first frame (+ trailer). The frame's own size is checked too: a
    logical screen of 1x1 may hold a frame of 60000x60000, and TF allocates the frame."""
    pos = 13
    if data[10] & 0x80:
        pos += 3 << ((data[10] & 7) + 1)  # global color table
    while True:
        block = data[pos]
        if block == 0x21:  # extension: label, then data sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor
            left, top, w, h, flags = struct.unpack("<HHHHB", data[pos + 1:pos + 10])
            check_pixels(left + w, top + h, max_pixels, "the GIF's first frame reaches ")
            pos += 10
            if flags & 0x80:
                pos += 3 << ((flags & 7) + 1)  # local color table
            end = _skip_sub_blocks(data, pos + 1)  # after the LZW minimum code size
            return data[:end] + b"\x3b"
        elif block == 0x3B:
            raise ValueError("no image in the file")
        else:
            raise ValueError(f"unknown block 0x{block:02X}")


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while data[pos]:
        pos += data[pos] + 1
    return pos + 1
