"""TIFF (classic and BigTIFF): the first page's size from IFD0, and checks that need no
decoding: the strip or tile table has the entries the image needs, not more, and lies inside
the file (a small file declaring millions of strips makes a decoder allocate and loop)."""
from __future__ import annotations

import struct

from .base import Bomb, Header, Truncated

_WIDTH, _HEIGHT, _SAMPLES, _ROWS_PER_STRIP, _PLANAR = 256, 257, 277, 278, 284
_STRIP_OFFSETS, _STRIP_COUNTS, _TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_COUNTS = (
    273, 279, 322, 323, 324, 325)
# TIFF field type -> bytes per value
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
               13: 4, 16: 8, 17: 8, 18: 8}
_SCALAR = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}



def header(head: bytes, file_size: int) -> Header:
    ifd = _Ifd(head)
    if _WIDTH not in ifd.fields or _HEIGHT not in ifd.fields:
        raise ValueError("no image size in the first IFD")
    width, height = ifd.value(_WIDTH), ifd.value(_HEIGHT)
    tiled = _TILE_OFFSETS in ifd.fields
    offsets, counts = (_TILE_OFFSETS, _TILE_COUNTS) if tiled else (_STRIP_OFFSETS, _STRIP_COUNTS)
    if offsets not in ifd.fields or width <= 0 or height <= 0:  # an old-style JPEG TIFF may
        return Header(width, height, pillow=True)  # point to its JPEG instead; probe refuses 0
    planes = ifd.value(_SAMPLES, 1) if ifd.value(_PLANAR, 1) == 2 else 1
    if tiled:
        tw, tl = ifd.value(_TILE_WIDTH), ifd.value(_TILE_LENGTH)
        if not tw or not tl:
            raise ValueError("a tiled image without a tile size")
        needed = -(-width // tw) * -(-height // tl) * planes
    else:
        rows = ifd.value(_ROWS_PER_STRIP, 2**32 - 1) or 1
        needed = -(-height // min(rows, max(height, 1))) * planes
    what = "tile" if tiled else "strip"
    for tag in (offsets, counts):
        if tag not in ifd.fields:
            continue
        typ, count, at = ifd.fields[tag]
        if count > needed:
            raise Bomb(f"it declares {count} {what}s, where its {width}x{height} image "
                       f"has {needed}")
        end = at + count * _TYPE_SIZES.get(typ, 1)
        if end > file_size:
            raise Truncated(f"its {what} table runs to byte {end}, the file has {file_size}")
    return Header(width, height, pillow=True)


class _Ifd:
    """The first IFD: tag -> (type, count, offset of its values in the file)."""

    def __init__(self, head: bytes):
        self.head = head
        self.endian = "<" if head[:2] == b"II" else ">"
        (magic,) = struct.unpack(self.endian + "H", head[2:4])
        self.big = magic == 43
        if self.big:
            (ifd,) = struct.unpack(self.endian + "Q", head[8:16])
            (n,) = struct.unpack(self.endian + "Q", head[ifd:ifd + 8])
            size, start, inline = 20, ifd + 8, 8
        else:
            (ifd,) = struct.unpack(self.endian + "I", head[4:8])
            (n,) = struct.unpack(self.endian + "H", head[ifd:ifd + 2])
            size, start, inline = 12, ifd + 2, 4
        self.fields: dict[int, tuple[int, int, int]] = {}
        for i in range(n):
            entry = head[start + i * size:start + (i + 1) * size]
            tag, typ = struct.unpack(self.endian + "HH", entry[:4])
            (count,) = struct.unpack(self.endian + ("Q" if self.big else "I"),
                                     entry[4:12 if self.big else 8])
            at = start + i * size + (12 if self.big else 8)
            if count * _TYPE_SIZES.get(typ, 1) > inline:
                (at,) = struct.unpack(self.endian + ("Q" if self.big else "I"),
                                      entry[12 if self.big else 8:size])
            self.fields[tag] = (typ, count, at)

    def value(self, tag: int, default: int = 0) -> int:
        """The first value of an integer field (`default` when absent)."""
        if tag not in self.fields:
            return default
        typ, count, at = self.fields[tag]
        if typ not in _SCALAR or count < 1:
            raise ValueError(f"tag {tag} is not an integer")
        fmt = self.endian + _SCALAR[typ]
        return struct.unpack(fmt, self.head[at:at + struct.calcsize(fmt)])[0]
