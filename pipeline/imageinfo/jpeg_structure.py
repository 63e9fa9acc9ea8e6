"""A JPEG's structure (scans, entropy-coded data, restart markers), checked on the whole file."""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .base import ImageError
from .jpeg import SOF_MARKERS

# Checked on the whole file before decoding, so pathological and damaged JPEGs are refused
# without spending a decode on them (a 10,000-scan progressive JPEG takes ~70 s to decode).

# Scans a JPEG may have. libjpeg's progressive script has 10 (6 for gray), mozjpeg's about as
# many; even one scan per AC coefficient and component would be ~200. Each scan is a pass over
# the image, so the decoder's work is bounded by both rules below.
MAX_JPEG_SCANS = 100
# Block visits of all scans / blocks in the image (libjpeg's progressive script makes ~5).
MAX_JPEG_PASSES = 40

_ARITHMETIC_SOF = {0xC9, 0xCA}


@dataclass(frozen=True)
class _Frame:
    width: int
    height: int
    marker: int
    components: dict[int, tuple[int, int]]  # component id -> (h, v) sampling factors
    hmax: int
    vmax: int

    def blocks(self, component: int) -> int:
        """Blocks of one component (what a scan of that component alone codes)."""
        h, v = self.components[component]
        return (_ceil(_ceil(self.width * h, self.hmax), 8)
                * _ceil(_ceil(self.height * v, self.vmax), 8))

    def mcus(self) -> int:
        """MCUs of a scan of several components."""
        return _ceil(self.width, 8 * self.hmax) * _ceil(self.height, 8 * self.vmax)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _Scan:
    components: tuple[int, ...]
    ss: int
    se: int
    al: int
    data_bytes: int  # entropy-coded bytes, restart markers excluded
    restarts: int  # RSTn markers inside
    restart_interval: int  # DRI in force (0: none)
    last_byte: int  # the last entropy-coded byte (carries the encoder's 1-bit padding)
    start: int = 0  # offsets of its entropy-coded data in the file: [start, end)
    end: int = 0
    # Its Huffman tables code a run of zero bits as flat blocks (the all-zero codes are DC
    # difference 0 and end-of-block, as optimized tables often make them), or a table is unknown:
    # a long run of zero bytes can then be a flat area. Otherwise it cannot be image data.
    zeros_can_be_flat: bool = True


def _jpeg_structure(data: bytes) -> tuple[_Frame, list[_Scan]]:
    """Walk every marker from SOI to the first EOI after the scans; ValueError if damaged."""
    frame: _Frame | None = None
    scans: list[_Scan] = []
    restart_interval, pos, n = 0, 2, len(data)
    markers = None
    first_symbols: dict[tuple[int, int], int] = {}  # (class, id) -> the symbol of the 0 code
    while True:
        pos = data.find(b"\xff", pos)  # junk between segments is tolerated, as libjpeg does
        while 0 <= pos < n and data[pos] == 0xFF:
            pos += 1
        if pos < 0 or pos >= n:
            raise _Truncated("the file ends before the end-of-image marker")
        marker, pos = data[pos], pos + 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            if not scans or frame is None:
                raise ValueError("no image data before the end-of-image marker")
            return frame, scans
        if pos + 2 > n:
            raise _Truncated("the file ends inside a marker segment")
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        segment = data[pos + 2:pos + length]
        if length < 2 or len(segment) < length - 2:
            raise _Truncated("the file ends inside a marker segment")
        if marker in SOF_MARKERS:
            frame = _parse_frame(marker, segment)
        elif marker == 0xDD:
            (restart_interval,) = struct.unpack(">H", segment[:2])
        elif marker == 0xC4:
            first_symbols.update(_first_symbols(segment))
        elif marker == 0xDA:
            if frame is None:
                raise ValueError("scan before the frame header")
            markers = markers or _MarkerIndex(data)
            start = pos + length
            end, restarts = markers.scan_end(start)
            last = data[end - 1] if end > start else 0xFF
            if data[end - 2:end] == b"\xff\x00":
                last = 0xFF  # a stuffed 0xFF data byte
            scans.append(_parse_scan(segment, end - start - 2 * restarts, restarts,
                                     restart_interval, last, start, end, first_symbols))
            pos = end
            continue
        pos += length


class _MarkerIndex:
    """Where the markers inside entropy-coded data are (numpy: a Python loop over every 0xFF
    byte of a 5 MB photo would cost more than the decode saves)."""

    def __init__(self, data: bytes):
        array = np.frombuffer(data, np.uint8)
        ff = np.flatnonzero(array[:-1] == 0xFF)
        following = array[ff + 1]
        rst = (following >= 0xD0) & (following <= 0xD7)
        self._ends = ff[~rst & (following != 0) & (following != 0xFF)]
        self._restarts = ff[rst]

    def scan_end(self, start: int) -> tuple[int, int]:
        """(offset of the marker ending the scan that starts at `start`, RSTn markers inside)."""
        i = np.searchsorted(self._ends, start)
        if i == len(self._ends):
            raise _Truncated("the file ends inside the image data")
        end = int(self._ends[i])
        restarts = np.searchsorted(self._restarts, end) - np.searchsorted(self._restarts, start)
        return end, int(restarts)


class _Truncated(ValueError):
    pass


def _parse_frame(marker: int, segment: bytes) -> _Frame:
    _, h, w, count = struct.unpack(">BHHB", segment[:6])
    components = {}
    for i in range(count):
        cid, sampling = segment[6 + 3 * i], segment[7 + 3 * i]
        components[cid] = (max(1, sampling >> 4), max(1, sampling & 15))
    if len(components) != count or not components:
        raise ValueError("bad frame header")
    return _Frame(w, h, marker, components, max(h for h, _ in components.values()),
                  max(v for _, v in components.values()))


def _first_symbols(segment: bytes) -> dict[tuple[int, int], int]:
    """DHT: for each table, the symbol of its all-zero code (canonical Huffman codes give code 0
    of the shortest length to the first symbol listed)."""
    tables, pos = {}, 0
    while pos + 17 <= len(segment):
        counts = segment[pos + 1:pos + 17]
        if sum(counts):
            tables[(segment[pos] >> 4, segment[pos] & 15)] = segment[pos + 17]
        pos += 17 + sum(counts)
    return tables


def _parse_scan(segment: bytes, data_bytes: int, restarts: int, interval: int, last: int,
                start: int, end: int, first_symbols: dict[tuple[int, int], int]) -> _Scan:
    count = segment[0]
    components = tuple(segment[1 + 2 * i] for i in range(count))
    selectors = [segment[2 + 2 * i] for i in range(count)]
    ss, se, a = segment[1 + 2 * count:4 + 2 * count]
    flat = all(first_symbols.get((0, t >> 4), 0) == 0 and first_symbols.get((1, t & 15), 0) == 0
               for t in selectors)  # DC category 0 (difference 0), AC end-of-block
    return _Scan(components, ss, se, a & 15, data_bytes, restarts, interval, last, start, end,
                 flat)


def check_jpeg_structure(data: bytes, defer_cut_check: bool = False) -> bool:
    """Refuse a JPEG whose structure shows it is damaged or pathological (ImageError), before
    any decoding. Where the structure only looks suspicious (the last scan ends without the
    encoder's padding bits), libjpeg decides: a strict decode that stops at its first warning.
    With `defer_cut_check`, where the decoded image's last block tells as much (see
    `last_block_tells`), return True instead: the caller asks libjpeg only if that block is gray.
    """
    try:
        frame, scans = _jpeg_structure(data)
    except _Truncated as e:
        raise ImageError("corrupt", f"JPEG is truncated: {e} (incomplete download or copy?)") from None
    except (ValueError, struct.error, IndexError) as e:
        raise ImageError("corrupt", f"JPEG structure is damaged ({e})") from None
    for scan in scans:
        if any(c not in frame.components for c in scan.components):
            raise ImageError("corrupt", "JPEG structure is damaged (a scan names a component "
                             "the frame does not have)")
    _check_jpeg_work(frame, scans)
    _check_jpeg_data_amount(frame, scans)
    _check_restart_markers(frame, scans)
    _check_progression_complete(frame, scans)
    hole = _zero_block_in_scans(data, scans)
    if hole is None and not _looks_cut(frame, scans):
        return False
    if hole is None and defer_cut_check and last_block_tells(frame, scans):
        return True
    if hole is None:
        reason = strict_jpeg_damage(data)
    else:
        offset, scan = hole
        where = f"{HOLE_BLOCK}+ zero bytes at byte {offset} of the image data"
        if frame.marker in (0xC0, 0xC1) and not scan.zeros_can_be_flat:
            raise ImageError("corrupt", f"JPEG image data is damaged: {where}, which its Huffman "
                             f"tables cannot code (a lost disk or network block?)")
        reason = strict_jpeg_damage(data, f"{where}: a lost disk or network block?", strict=True)
    if reason:
        raise ImageError("corrupt", reason)
    return False


def _check_jpeg_work(frame: _Frame, scans: list[_Scan]) -> None:
    if len(scans) > MAX_JPEG_SCANS:
        raise ImageError("too_large", f"JPEG has {len(scans)} scans (at most {MAX_JPEG_SCANS}: "
                         f"each scan is a decoding pass over the image)")
    blocks = sum(frame.blocks(c) for c in frame.components)
    visits = sum(frame.blocks(c) for scan in scans for c in scan.components)
    if visits > MAX_JPEG_PASSES * blocks:
        raise ImageError("too_large", f"JPEG scans pass over the image {visits / blocks:.0f} "
                         f"times (at most {MAX_JPEG_PASSES})")


def _check_jpeg_data_amount(frame: _Frame, scans: list[_Scan]) -> None:
    """Huffman coding spends at least one bit per block on its DC coefficient: less data than
    that is a header promising a far larger image than the file holds."""
    if frame.marker in _ARITHMETIC_SOF:
        return  # arithmetic coding can spend less than a bit per block
    blocks = sum(frame.blocks(c) for c in frame.components)
    have = sum(scan.data_bytes for scan in scans)
    if have * 8 < blocks:
        raise ImageError("corrupt", f"JPEG holds {have} bytes of image data, but its "
                         f"{frame.width}x{frame.height} frame needs at least {-(-blocks // 8)} "
                         f"(truncated, or a forged header?)")


def _check_restart_markers(frame: _Frame, scans: list[_Scan]) -> None:
    """With restart intervals, the number of restart markers in each scan is known exactly."""
    for i, scan in enumerate(scans, 1):
        if not scan.restart_interval:
            continue
        units = frame.mcus() if len(scan.components) > 1 else frame.blocks(scan.components[0])
        expected = -(-units // scan.restart_interval) - 1
        if scan.restarts < expected:
            raise ImageError("corrupt", f"JPEG is truncated: scan {i} of {len(scans)} has "
                             f"{scan.restarts} of its {expected} restart markers")


def _check_progression_complete(frame: _Frame, scans: list[_Scan]) -> None:
    """A progressive JPEG's scans must bring every coefficient of every component to full
    precision; the last ones missing is a file cut short (and decoded blurred, not refused)."""
    if frame.marker not in (0xC2, 0xCA):
        return
    final = {c: [False] * 64 for c in frame.components}
    for scan in scans:
        if scan.al == 0:
            for c in scan.components:
                for k in range(scan.ss, min(scan.se, 63) + 1):
                    final[c][k] = True
    for c, done in final.items():
        if not all(done):
            missing = done.index(False)
            raise ImageError("corrupt", f"progressive JPEG is incomplete: coefficient {missing} "
                             f"of component {c} never gets its final scan (truncated?)")


def _looks_cut(frame: _Frame, scans: list[_Scan]) -> bool:
    """Whether to ask libjpeg. Encoders end a scan by padding its last byte with 1 bits, so a
    last byte ending in a 0 bit is a scan cut off (or 1 valid file in 8). Progressive,
    arithmetic-coded and CMYK files are always asked: their damage shows in no cheaper way
    (the reader's gray-tail check sees only 3-component baseline files)."""
    return (frame.marker not in (0xC0, 0xC1) or len(frame.components) == 4
            or not scans[-1].last_byte & 1)


# A block of zero bytes this long, aligned to its size, inside the entropy-coded data: what a
# lost disk or network block leaves (a hole in a sparse file, a zero-filled read), and nothing
# an encoder writes: a zero bit string that long would be hundreds of blocks of one code.
# (The shared sample's 100 photos and their re-encodes hold runs of at most ~50 zero bytes
# inside their scans; see tests/test_imageinfo.py -k hole.)
HOLE_BLOCK = 256


def _zero_block_in_scans(data: bytes, scans: list[_Scan]) -> tuple[int, _Scan] | None:
    """(offset, scan) of the first aligned HOLE_BLOCK of zero bytes inside a scan (any zero run
    of twice that length holds one), or None. One pass over the file as 64-bit words."""
    words = len(data) // HOLE_BLOCK * (HOLE_BLOCK // 8)
    if not words:
        return None
    blocks = np.frombuffer(data, np.uint64, count=words).reshape(-1, HOLE_BLOCK // 8)
    zero = np.flatnonzero(~blocks.any(axis=1)) * HOLE_BLOCK
    for scan in scans:
        inside = zero[(zero >= scan.start) & (zero + HOLE_BLOCK <= scan.end)]
        if len(inside):
            return int(inside[0]), scan
    return None


def last_block_tells(frame: _Frame, scans: list[_Scan]) -> bool:
    """Whether a cut in this JPEG shows in its decoded last block: in a baseline Huffman JPEG of
    one interleaved scan (not CMYK), libjpeg decodes every block after the cut exactly gray
    (128, 128, 128), so a cut file's bottom-right pixel is gray at any DCT scale. The strict
    decode `_looks_cut` asks for (a second entropy decode of the whole file: at 12 MP most of
    the cost of the first) is then needed only when that corner is gray."""
    return frame.marker in (0xC0, 0xC1) and len(frame.components) in (1, 3) and len(scans) == 1


_HARMLESS_WARNINGS = ("extraneous bytes",)


def strict_jpeg_damage(data: bytes, why: str = "truncated?", strict: bool = False) -> str | None:
    """libjpeg-turbo's first 'Corrupt JPEG data' warning for this file, or None. The decode is
    at 1/8 scale in one channel: every entropy-coded bit is read, little else is computed."""
    import simplejpeg

    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if colorspace == "CMYK" else "GRAY",
                               min_factor=8)
    except ValueError as e:
        message = str(e)
        # strict (a hole was seen): bytes left over after the image are the decoder thrown out
        # of step by it, not an encoder's padding
        harmless = () if strict else _HARMLESS_WARNINGS
        if "Corrupt JPEG data" in message and not any(w in message for w in harmless):
            return f"JPEG image data is damaged (libjpeg: {message.strip()}); {why}"
    return None
