"""Read an image's format, size and EXIF orientation from its first bytes, without decoding.

Used in the tf.data graph (through tf.numpy_function) as the decompression-bomb guard, and in
Python to explain why an image could not be labeled. It also knows where TensorFlow's decoders
go wrong (palette BMPs, animated WebP, trailing bytes, every-frame GIF decoding) and either
refuses those files with a clear reason or hands TensorFlow bytes it decodes right (`prepare`).
"""
from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

import numpy as np

HEAD_BYTES = 65536  # enough for nearly every header; `NeedMoreBytes` asks for the rest

# The formats TensorFlow decodes; the others are recognised only to name them in errors.
DECODABLE = ("jpeg", "png", "gif", "bmp", "webp")
FORMAT_CODES = {name: i for i, name in enumerate(DECODABLE)}

JPEG_EOI = b"\xff\xd9"


class ImageError(Exception):
    """Why an image cannot be labeled: `kind` is machine-readable, str(self) is for people;
    width/height when the header gave them (an error row carries them)."""

    def __init__(self, kind: str, message: str, width: int | None = None,
                 height: int | None = None):
        super().__init__(message)
        self.kind, self.width, self.height = kind, width, height


class NeedMoreBytes(Exception):
    """The header goes on past the bytes given; call again with the whole file."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    orientation: int = 1  # EXIF orientation tag, 1..8
    prepare: bool = False  # TensorFlow must decode `prepare(data, ...)`, not the file itself
    # A JPEG that may be cut short, left to the decoder's last block (see `inspect`)
    check_last_block: bool = False


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
    """Format, width, height, orientation from the first bytes; raise ImageError if unusable.

    `file_size` None means `head` is the whole file. If the header runs past `head` and the
    file is longer, raise NeedMoreBytes instead of calling the image damaged.
    """
    if file_size == 0 or not head:
        raise ImageError("empty_file", "the file is empty (0 bytes)")
    fmt = sniff_format(head)
    if fmt is None:
        raise _not_an_image(head)
    if fmt not in DECODABLE:
        raise ImageError("unsupported_format",
                         f"{fmt.upper()} images are not supported (TensorFlow cannot decode "
                         f"{fmt.upper()}); convert them to JPEG or PNG")
    size = len(head) if file_size is None else file_size
    try:
        width, height, orientation, prepare = _PARSERS[fmt](head, size)
    except (struct.error, IndexError):
        if len(head) < size:
            raise NeedMoreBytes(fmt) from None
        raise ImageError("corrupt", f"{fmt.upper()} header is truncated: the file ends inside "
                         f"it") from None
    except ValueError as e:
        raise ImageError("corrupt", f"{fmt.upper()} header is damaged ({e})") from None
    if width <= 0 or height <= 0:
        raise ImageError("corrupt", f"{fmt.upper()} header gives an invalid size {width}x{height}")
    return ImageInfo(fmt, width, height, orientation, prepare)


def check_size(info: ImageInfo, max_pixels: int) -> None:
    _check_pixels(info.width, info.height, max_pixels)


def _check_pixels(width: int, height: int, max_pixels: int, what: str = "") -> None:
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"{what}{width}x{height} = {width * height / 1e6:.1f} megapixels is above "
            f"--max-pixels {max_pixels / 1e6:.1f} megapixels",
        )


def inspect(head: bytes, file_size: int, max_pixels: int, tail: bytes | None = None,
            defer_cut_check: bool = False) -> ImageInfo:
    """Every check that needs no decoding: format, size (bomb guard), JPEG structure.

    `head` is the file's first bytes or all of it; `tail` its last two bytes (None: `head` is
    the whole file). Raise ImageError if the image cannot be labeled, NeedMoreBytes if `head`
    is not enough to tell (a JPEG's structure is always checked on the whole file).
    `defer_cut_check`: where a JPEG only looks cut and its last decoded block tells (see
    `last_block_tells`), return `check_last_block` instead of asking libjpeg here.
    """
    whole = len(head) >= file_size
    info = probe(head, None if whole else file_size)
    check_size(info, max_pixels)
    if info.format == "jpeg":
        if not whole:
            raise NeedMoreBytes("jpeg")
        if check_jpeg_structure(head, defer_cut_check):
            return dataclasses.replace(info, check_last_block=True)
    return info


# --- JPEG -------------------------------------------------------------------------------------

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_LIBJPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC9, 0xCA}  # sequential/progressive, Huffman or arithmetic


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
        if marker in _SOF_MARKERS:
            return
        pos += length


def _jpeg(head: bytes, file_size: int) -> tuple[int, int, int, bool]:
    """Walk the JPEG markers up to the frame header; pick up EXIF orientation on the way (from
    the first EXIF segment, as Pillow's exif_transpose does)."""
    orientation = None
    for marker, pos, length in _jpeg_segments(head):
        if marker == 0xE1 and orientation is None and head[pos + 2:pos + 8] == b"Exif\x00\x00":
            orientation = _exif_orientation(head[pos + 8:pos + length])
        if marker in _SOF_MARKERS:
            precision, h, w = struct.unpack(">BHH", head[pos + 2:pos + 7])
            if marker not in _LIBJPEG_SOF:
                raise ImageError("unsupported_format", f"lossless or hierarchical JPEG (SOF "
                                 f"0x{marker:02X}) is not supported; convert it to PNG", w, h)
            if precision != 8:
                raise ImageError("unsupported_format",
                                 f"{precision}-bit JPEG is not supported (only 8-bit); "
                                 f"convert it to PNG", w, h)
            return w, h, orientation or 1, False
    raise ValueError("no frame header")  # unreachable: the walk returns or raises


# EXIF types Pillow reads the orientation from (SHORT, LONG, SBYTE, SSHORT, SLONG): the struct
# format of one value. A BYTE orientation comes out of Pillow as bytes and is not applied.
_EXIF_INTEGERS = {3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag of IFD0 (1..8); 1 when absent, broken, or not one integer. Cameras
    write SHORT, some tools LONG: both count, as in Pillow's exif_transpose."""
    try:
        endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
        ifd = struct.unpack(endian + "I", tiff[4:8])[0]
        (count,) = struct.unpack(endian + "H", tiff[ifd:ifd + 2])
        for i in range(count):
            entry = tiff[ifd + 2 + 12 * i: ifd + 14 + 12 * i]
            tag, typ, n = struct.unpack(endian + "HHI", entry[:8])
            if tag == 0x0112:
                if typ not in _EXIF_INTEGERS or n != 1:
                    return 1
                fmt = endian + _EXIF_INTEGERS[typ]
                (value,) = struct.unpack(fmt, entry[8:8 + struct.calcsize(fmt)])
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error, IndexError):
        pass  # a broken EXIF block is ignored, as image viewers do
    return 1


# --- JPEG structure: scans, entropy-coded data, restart markers -------------------------------
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


def _jpeg_structure(data: bytes) -> tuple[_Frame, list[_Scan]]:
    """Walk every marker from SOI to the first EOI after the scans; ValueError if damaged."""
    frame: _Frame | None
    scans: list[_Scan]
    frame, scans, restart_interval, pos, n = None, [], 0, 2, len(data)
    markers = None
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
            if not scans or frame is None:  # no scan is read before the frame
                raise ValueError("no image data before the end-of-image marker")
            return frame, scans
        if pos + 2 > n:
            raise _Truncated("the file ends inside a marker segment")
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        segment = data[pos + 2:pos + length]
        if length < 2 or len(segment) < length - 2:
            raise _Truncated("the file ends inside a marker segment")
        if marker in _SOF_MARKERS:
            frame = _parse_frame(marker, segment)
        elif marker == 0xDD:
            (restart_interval,) = struct.unpack(">H", segment[:2])
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
                                     restart_interval, last))
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


def _parse_scan(segment: bytes, data_bytes: int, restarts: int, interval: int, last: int) -> _Scan:
    count = segment[0]
    components = tuple(segment[1 + 2 * i] for i in range(count))
    ss, se, a = segment[1 + 2 * count:4 + 2 * count]
    return _Scan(components, ss, se, a & 15, data_bytes, restarts, interval, last)


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
    if not _looks_cut(frame, scans):
        return False
    if defer_cut_check and last_block_tells(frame, scans):
        return True
    reason = strict_jpeg_damage(data)
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


def last_block_tells(frame: _Frame, scans: list[_Scan]) -> bool:
    """Whether a cut in this JPEG shows in its decoded last block: in a baseline Huffman JPEG of
    one interleaved scan (not CMYK), libjpeg decodes every block after the cut exactly gray
    (128, 128, 128), so a cut file's bottom-right pixel is gray at any DCT scale. The strict
    decode `_looks_cut` asks for (a second entropy decode of the whole file: at 12 MP most of
    the cost of the first) is then needed only when that corner is gray."""
    return frame.marker in (0xC0, 0xC1) and len(frame.components) in (1, 3) and len(scans) == 1


_HARMLESS_WARNINGS = ("extraneous bytes",)


def strict_jpeg_damage(data: bytes) -> str | None:
    """libjpeg-turbo's first 'Corrupt JPEG data' warning for this file, or None. The decode is
    at 1/8 scale in one channel: every entropy-coded bit is read, little else is computed."""
    import simplejpeg

    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if colorspace == "CMYK" else "GRAY",
                               min_factor=8)
    except ValueError as e:
        message = str(e)
        if "Corrupt JPEG data" in message and not any(w in message for w in _HARMLESS_WARNINGS):
            return f"JPEG image data is damaged (libjpeg: {message.strip()}); truncated?"
    return None


# --- PNG, GIF ----------------------------------------------------------------------------------

def _png(head: bytes, file_size: int) -> tuple[int, int, int, bool]:
    if head[12:16] != b"IHDR":
        raise ValueError("missing IHDR chunk")
    w, h = struct.unpack(">II", head[16:24])
    return w, h, 1, False


def _gif(head: bytes, file_size: int) -> tuple[int, int, int, bool]:
    # TF decodes every frame of a GIF (memory!) even when asked for the first: always prepare.
    w, h = struct.unpack("<HH", head[6:10])
    return w, h, 1, True


def _gif_first_frame(data: bytes, max_pixels: int) -> bytes:
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
            _check_pixels(left + w, top + h, max_pixels, "the GIF's first frame reaches ")
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


# --- BMP ---------------------------------------------------------------------------------------

_BMP_COMPRESSION = {1: "RLE8", 2: "RLE4", 3: "BITFIELDS", 4: "JPEG", 5: "PNG", 6: "ALPHABITFIELDS"}
_BMP_STANDARD_MASKS = (0x00FF0000, 0x0000FF00, 0x000000FF)


def _bmp(head: bytes, file_size: int) -> tuple[int, int, int, bool]:
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


def _bmp_trimmed(data: bytes) -> bytes:
    pixels_at, = struct.unpack("<I", data[10:14])
    w, h, _, bpp = struct.unpack("<iiHH", data[18:30])
    return data[:pixels_at + (w * (bpp // 8) + 3) // 4 * 4 * abs(h)]


# --- WebP --------------------------------------------------------------------------------------

_VP8X_ANIMATION, _VP8X_ALPHA = 0x02, 0x10


def _webp(head: bytes, file_size: int) -> tuple[int, int, int, bool]:
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
    return w, h, 1, animated


def _webp_flagged_rgba(data: bytes) -> bytes:
    """TF 2.21 decodes an animated WebP as RGBA but shapes it by the alpha flag: without the
    flag the bytes come out as scrambled RGB. Setting the flag gives the true first frame."""
    return data[:20] + bytes([data[20] | _VP8X_ALPHA]) + data[21:]


def prepare(data: bytes, info: ImageInfo, max_pixels: int) -> bytes:
    """The bytes TF should decode when `info.prepare`: a GIF's first frame alone, an animated
    WebP flagged RGBA, a BMP without trailing bytes. Raise ImageError if that is impossible."""
    try:
        if info.format == "gif":
            return _gif_first_frame(data, max_pixels)
        if info.format == "webp":
            return _webp_flagged_rgba(data)
        if info.format == "bmp":
            return _bmp_trimmed(data)
    except (struct.error, IndexError):
        raise ImageError("corrupt", f"{info.format.upper()} is truncated: the file ends inside "
                         f"the first frame") from None
    except ValueError as e:
        raise ImageError("corrupt", f"{info.format.upper()} is damaged ({e})") from None
    return data


def damage(data: bytes, info: ImageInfo) -> str | None:
    """A plain reason for a decode failure, where the file's structure shows one."""
    if info.format == "png" and b"IEND" not in data[-4096:]:
        return "PNG is truncated: the file ends before the IEND chunk"
    if info.format == "webp":
        expected = struct.unpack("<I", data[4:8])[0] + 8
        if len(data) < expected:
            return f"WebP is truncated: {expected - len(data)} of its {expected} bytes are missing"
    return None


_PARSERS = {"jpeg": _jpeg, "png": _png, "gif": _gif, "bmp": _bmp, "webp": _webp}
