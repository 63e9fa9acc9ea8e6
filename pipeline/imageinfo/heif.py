"""HEIF/HEIC and AVIF (ISO base media files): the primary image's stored size, read from the
`meta` box, and checks that need no decoding: its data lies inside the file, and a grid's tiles
cover about the image, not far more (each tile is decoded whole)."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .base import Bomb, Header, Truncated

# ftyp brands: HEVC-coded HEIF (images, sequences), AVIF, and the generic image brands
_HEVC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"}
_AVIF_BRANDS = {b"avif", b"avis"}
_IMAGE_BRANDS = {b"mif1", b"msf1", b"mif2", b"miaf"}
# A grid's tiles may overhang its right and bottom edges, never by a whole tile: more than this
# many times the image's pixels is a file built to make the decoder work (a tile bomb).
MAX_TILE_COVER = 4


def brand(head: bytes) -> str | None:
    """The format of an ISO media file by its ftyp brands: "avif" (major brand, or a compatible
    one unless the major says HEVC), "heif", or None (MP4, QuickTime, 3GP: a video)."""
    (size,) = struct.unpack(">I", head[:4])
    major = head[8:12]
    compatible = {head[i:i + 4] for i in range(16, min(size, len(head)) - 3, 4)}
    if major in _AVIF_BRANDS or (major not in _HEVC_BRANDS and compatible & _AVIF_BRANDS):
        return "avif"
    if {major, *compatible} & (_HEVC_BRANDS | _IMAGE_BRANDS):
        return "heif"
    return None


@dataclass
class _Meta:
    primary: int | None = None
    properties: list[tuple[bytes, bytes]] = field(default_factory=list)  # ipco, in order
    associations: dict[int, list[int]] = field(default_factory=dict)  # item -> property indexes
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # item -> (offset, len)
    tiles: dict[int, list[int]] = field(default_factory=dict)  # item -> dimg references
    types: dict[int, bytes] = field(default_factory=dict)  # item -> type (hvc1, av01, grid, ...)


def header(head: bytes, file_size: int) -> Header:
    meta = _read_meta(head)
    if meta.primary is None:
        raise ValueError("no primary item (pitm)")
    width, height = _size(meta, meta.primary)
    for item in [meta.primary, *meta.tiles.get(meta.primary, [])]:
        for offset, length in meta.extents.get(item, []):
            if offset + length > file_size:
                raise Truncated(f"the image data runs to byte {offset + length}, the file "
                                f"has {file_size}")
    tiles = meta.tiles.get(meta.primary, [])
    if tiles:
        covered = sum(w * h for w, h in (_size(meta, t) for t in tiles))
        if covered > MAX_TILE_COVER * width * height:
            raise Bomb(f"its {len(tiles)} tiles hold {covered / 1e6:.1f} megapixels, "
                       f"{covered / (width * height):.0f} times the {width}x{height} image")
    return Header(width, height, pillow=True)




def _size(meta: _Meta, item: int) -> tuple[int, int]:
    """The item's size as stored: its ispe, cut to its clean aperture (clap) if it has one, as
    libheif does (an odd-sized photo is coded a pixel larger); before irot/imir."""
    size: tuple[int, int] | None = None
    clap: tuple[int, int] | None = None
    for index in meta.associations.get(item, []):
        kind, body = meta.properties[index - 1] if 0 < index <= len(meta.properties) else (b"", b"")
        if kind == b"ispe":
            size = struct.unpack(">II", _need(body, 4, 12))
        elif kind == b"clap":
            wn, wd, hn, hd = struct.unpack(">IIII", _need(body, 0, 16))
            if wd and hd:
                clap = (int(wn / wd + 0.5), int(hn / hd + 0.5))
    if size is None:
        raise ValueError(f"item {item} has no size (ispe)")
    if clap and 0 < clap[0] <= size[0] and 0 < clap[1] <= size[1]:
        return clap
    return size


def _need(data: bytes, start: int, end: int) -> bytes:
    if end > len(data):
        raise IndexError("box runs past the bytes read")
    return data[start:end]


def _boxes(data: bytes, start: int, end: int):
    """(type, body start, body end) of each box in data[start:end]."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = pos + 8
        if size == 1:
            (size,) = struct.unpack(">Q", _need(data, pos + 8, pos + 16))
            body = pos + 16
        elif size == 0:
            size = end - pos
        if size < body - pos:
            raise ValueError(f"bad {kind!r} box size")
        yield kind, body, pos + size
        pos += size


def _read_meta(head: bytes) -> _Meta:
    for kind, body, end in _boxes(head, 0, 1 << 62):
        if kind == b"meta":
            _need(head, body, end)
            return _parse_meta(head, body + 4, end)  # a full box: version and flags first
        if kind == b"mdat" or end > len(head):
            _need(head, 0, end)  # the meta box is further on: NeedMoreBytes, or truncated
    raise IndexError("no meta box")


def _parse_meta(data: bytes, start: int, end: int) -> _Meta:
    meta = _Meta()
    for kind, body, box_end in _boxes(data, start, end):
        if kind == b"pitm":
            meta.primary = struct.unpack(">H" if data[body] == 0 else ">I",
                                         data[body + 4:body + (6 if data[body] == 0 else 8)])[0]
        elif kind == b"iprp":
            for sub, sub_body, sub_end in _boxes(data, body, box_end):
                if sub == b"ipco":
                    meta.properties = [(k, data[b:e]) for k, b, e in _boxes(data, sub_body, sub_end)]
                elif sub == b"ipma":
                    _parse_ipma(data, sub_body, meta.associations)
        elif kind == b"iloc":
            _parse_iloc(data, body, meta.extents)
        elif kind == b"iref":
            _parse_iref(data, body, box_end, meta.tiles)
        elif kind == b"iinf":
            _parse_iinf(data, body, box_end, meta.types)
    return meta


def _parse_ipma(data: bytes, pos: int, out: dict[int, list[int]]) -> None:
    version, flags = data[pos], int.from_bytes(data[pos + 1:pos + 4], "big")
    (count,) = struct.unpack(">I", data[pos + 4:pos + 8])
    pos += 8
    for _ in range(count):
        if version < 1:
            (item,) = struct.unpack(">H", data[pos:pos + 2])
            pos += 2
        else:
            (item,) = struct.unpack(">I", data[pos:pos + 4])
            pos += 4
        n = data[pos]
        pos += 1
        indexes = []
        for _ in range(n):
            if flags & 1:
                (value,) = struct.unpack(">H", data[pos:pos + 2])
                indexes.append(value & 0x7FFF)
                pos += 2
            else:
                indexes.append(data[pos] & 0x7F)
                pos += 1
        out[item] = indexes


def _uint(data: bytes, pos: int, size: int) -> int:
    if pos + size > len(data):
        raise IndexError("iloc runs past the bytes read")
    return int.from_bytes(data[pos:pos + size], "big") if size else 0


def _parse_iloc(data: bytes, pos: int, out: dict[int, list[tuple[int, int]]]) -> None:
    version = data[pos]
    offset_size, length_size = data[pos + 4] >> 4, data[pos + 4] & 15
    base_size, index_size = data[pos + 5] >> 4, (data[pos + 5] & 15) if version in (1, 2) else 0
    pos += 6
    id_size = 4 if version == 2 else 2
    count = _uint(data, pos, id_size)
    pos += id_size
    for _ in range(count):
        item = _uint(data, pos, id_size)
        pos += id_size
        method = _uint(data, pos, 2) & 15 if version in (1, 2) else 0
        pos += 2 if version in (1, 2) else 0
        pos += 2  # data reference index
        base = _uint(data, pos, base_size)
        pos += base_size
        extents = []
        n_extents = _uint(data, pos, 2)
        pos += 2
        for _ in range(n_extents):
            pos += index_size
            offset = _uint(data, pos, offset_size)
            length = _uint(data, pos + offset_size, length_size)
            pos += offset_size + length_size
            extents.append((base + offset, length))
        if method == 0:  # in the file (1: in the idat box, 2: in another item)
            out[item] = extents


def _parse_iref(data: bytes, pos: int, end: int, out: dict[int, list[int]]) -> None:
    size = 2 if data[pos] == 0 else 4
    for kind, body, _ in _boxes(data, pos + 4, end):
        if kind != b"dimg":
            continue
        item, count = _uint(data, body, size), _uint(data, body + size, 2)
        start = body + size + 2
        out[item] = [_uint(data, start + i * size, size) for i in range(count)]


def _parse_iinf(data: bytes, pos: int, end: int, out: dict[int, bytes]) -> None:
    pos += 4 + (2 if data[pos] == 0 else 4)  # version, flags, entry count
    for kind, body, _ in _boxes(data, pos, end):
        if kind == b"infe" and data[body] >= 2:  # version 2/3: id, protection index, type
            size = 2 if data[body] == 2 else 4
            out[_uint(data, body + 4, size)] = data[body + 6 + size:body + 10 + size]


# --- the coded data: every NAL unit (HEVC) or OBU (AV1) of the primary image and its tiles ---
# Both decoders conceal damage: libde265 decodes a tile of zeros or of random bytes without an
# error, into a gray or garbled patch. Their framing is exact, though: a damaged or zeroed tile
# breaks it (damage inside one unit's payload stays unseen, as a bit flip in a JPEG scan does).

_HEVC_VCL = 32  # NAL unit types below this are coded slices


def check_coded_data(data: bytes) -> None:
    """ValueError naming the first coded item of the primary image whose framing is broken."""
    meta = _read_meta(data)
    if meta.primary is None:
        return
    items = meta.tiles.get(meta.primary) or [meta.primary]
    for n, item in enumerate(items, 1):
        kind = meta.types.get(item)
        if kind not in (b"hvc1", b"av01") or item not in meta.extents:
            continue
        coded = b"".join(data[o:o + length] for o, length in meta.extents[item])
        problem = _nal_problem(coded, _nal_length_size(meta, item)) if kind == b"hvc1" \
            else _obu_problem(coded)
        if problem:
            where = f"tile {n} of {len(items)}" if len(items) > 1 else "the image"
            raise ValueError(f"{where}: {problem}")


def _nal_length_size(meta: _Meta, item: int) -> int:
    for index in meta.associations.get(item, []):
        kind, body = meta.properties[index - 1] if 0 < index <= len(meta.properties) else (b"", b"")
        if kind == b"hvcC" and len(body) > 21:
            return (body[21] & 3) + 1
    return 4


def _nal_problem(coded: bytes, length_size: int) -> str | None:
    pos, slices = 0, 0
    while pos < len(coded):
        length = int.from_bytes(coded[pos:pos + length_size], "big")
        pos += length_size
        if length < 2 or pos + length > len(coded):
            return f"a NAL unit of {length} bytes at byte {pos - length_size} of {len(coded)}"
        if coded[pos] & 0x80 or not coded[pos + 1] & 7:
            return f"a NAL unit with an invalid header at byte {pos - length_size}"
        slices += (coded[pos] >> 1) & 0x3F < _HEVC_VCL
        pos += length
    return None if slices else "no coded slice"


def _obu_problem(coded: bytes) -> str | None:
    pos, frames = 0, 0
    while pos < len(coded):
        header, start = coded[pos], pos
        if header & 0x81:  # forbidden bit, reserved bit
            return f"an OBU with an invalid header at byte {pos}"
        pos += 2 if header & 4 else 1  # the extension byte
        if not header & 2:  # no size field: the OBU runs to the end
            return None if frames or (header >> 3) & 15 in (3, 6) else "no coded frame"
        size, shift = 0, 0
        while True:
            if pos >= len(coded) or shift > 56:
                return f"an OBU size running past the data at byte {start}"
            size |= (coded[pos] & 0x7F) << shift
            shift += 7
            pos += 1
            if not coded[pos - 1] & 0x80:
                break
        if pos + size > len(coded):
            return f"an OBU of {size} bytes at byte {start} of {len(coded)}"
        frames += (header >> 3) & 15 in (3, 6)  # frame header, frame
        pos += size
    return None if frames else "no coded frame"
