"""Files in the formats Pillow (+ pillow-heif) decodes for the reader: HEIF/HEIC, AVIF, TIFF,
lossless JPEG, RLE/palette BMP, written from real photos; and damaged ones. Used by badfiles'
catalogue, the decoder's tests and scripts/bench.py (`sys.path.insert(0, "tests")`).
"""
from __future__ import annotations

import io
import struct

import numpy as np


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array)


def _saved(image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_orientation(value: int):
    from PIL import Image

    exif = Image.Exif()  # a new one each time: Pillow's AVIF encoder pops the tag from it
    exif[0x0112] = value
    return exif


def heic(array: np.ndarray, orientation: int = 1, **kw) -> bytes:
    """HEIC by pillow-heif (x265); an orientation becomes the file's irot/imir transform."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    if orientation != 1:
        kw["exif"] = exif_orientation(orientation).tobytes()
    return _saved(_pil(array), "HEIF", **({"quality": 90} | kw))


def heic_grid(array: np.ndarray, tile: int = 128) -> bytes:
    """A HEIC stored as a grid of tiles, as iPhones write them (512x512 tiles there)."""
    return heic(array, tile_size=tile)


def heic_two_images(primary: np.ndarray, other: np.ndarray) -> bytes:
    """Two images, the second one primary (labeled); the first is what a naive reader shows."""
    return heic(other, save_all=True, append_images=[_pil(primary)], primary_index=1)


def avif(array: np.ndarray, orientation: int = 1, **kw) -> bytes:
    """AVIF by Pillow (libavif); an orientation becomes irot/imir, read back as the EXIF tag."""
    if orientation != 1:
        kw["exif"] = exif_orientation(orientation)
    return _saved(_pil(array), "AVIF", **({"quality": 90} | kw))


def tiff(array: np.ndarray, mode: str = "RGB", orientation: int = 1, **kw) -> bytes:
    if orientation != 1:
        kw["exif"] = exif_orientation(orientation)
    return _saved(_pil(array).convert(mode), "TIFF", **kw)


def tiff_pages(pages: list[np.ndarray]) -> bytes:
    return _saved(_pil(pages[0]), "TIFF", save_all=True, append_images=[_pil(p) for p in pages[1:]])


def tiff_raw(array: np.ndarray, rows_per_strip: int | None = None,
             strip_count: int | None = None) -> bytes:
    """An uncompressed TIFF written by hand: 8 or 16-bit by dtype (Pillow cannot write 16-bit
    RGB), gray or RGB by shape. `strip_count` overrides the number of strips declared (a bomb:
    millions of strips for a small image)."""
    array = array if array.ndim == 3 else array[..., None]
    h, w, channels = array.shape
    bits = array.dtype.itemsize * 8
    pixels = array.astype(f"<u{array.dtype.itemsize}").tobytes()
    rows = rows_per_strip or h
    strips = -(-h // rows)
    row_bytes = w * channels * bits // 8
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, channels, None), (259, 3, 1, 1),
               (262, 3, 1, 2 if channels == 3 else 1), (273, 4, strip_count or strips, None),
               (277, 3, 1, channels), (278, 4, 1, rows), (279, 4, strip_count or strips, None)]
    ifd_size = 2 + 12 * len(entries) + 4
    extra_at = 8 + ifd_size
    bits_at, offsets_at = extra_at, extra_at + 2 * channels
    counts_at = offsets_at + 4 * strips
    data_at = counts_at + 4 * strips
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for tag, typ, count, value in entries:
        if tag == 258:
            value = bits if channels == 1 else bits_at
        elif tag == 273:
            value = data_at if strips == 1 else offsets_at
        elif tag == 279:
            value = row_bytes * rows if strips == 1 else counts_at
        out += struct.pack("<HHI", tag, typ, count)
        out += struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
    out += b"\x00\x00\x00\x00" + struct.pack(f"<{channels}H", *[bits] * channels)
    starts = [data_at + i * rows * row_bytes for i in range(strips)]
    sizes = [min(rows, h - i * rows) * row_bytes for i in range(strips)]
    out += struct.pack(f"<{strips}I", *starts) + struct.pack(f"<{strips}I", *sizes)
    return bytes(out + pixels)


def bmp_rle8(array: np.ndarray) -> bytes:
    """An 8-bit palette BMP with RLE8 compression, written by hand (Pillow reads RLE BMPs but
    never writes them)."""
    image = _pil(array).convert("P")
    indexes = np.asarray(image)
    palette = np.array(image.getpalette()[:768], np.uint8).reshape(-1, 3)
    palette = np.pad(palette, ((0, 256 - len(palette)), (0, 0)))
    runs = bytearray()
    for row in indexes[::-1]:  # bottom-up
        i = 0
        while i < len(row):
            j = i
            while j < len(row) and j - i < 255 and row[j] == row[i]:
                j += 1
            runs += bytes([j - i, row[i]])
            i = j
        runs += b"\x00\x00"  # end of line
    runs[-2:] = b"\x00\x01"  # end of bitmap
    h, w = indexes.shape
    table = np.hstack([palette[:, ::-1], np.zeros((256, 1), np.uint8)]).tobytes()  # BGR0
    pixels_at = 14 + 40 + len(table)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 1, len(runs), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", pixels_at + len(runs), 0, 0, pixels_at) + info + table + bytes(runs)


def lossless_jpeg(array: np.ndarray) -> bytes:
    """An 8-bit lossless JPEG (SOF3, predictor 1: the sample to the left), written by hand:
    Pillow writes no lossless JPEG. Meant for small images (a Python loop per sample)."""
    array = array if array.ndim == 3 else array[..., None]
    h, w, channels = array.shape
    x = array.astype(np.int32)
    predicted = np.empty_like(x)
    predicted[:, 1:] = x[:, :-1]
    predicted[1:, 0] = x[:-1, 0]
    predicted[0, 0] = 128
    diffs = (x - predicted).reshape(-1)  # interleaved: every component of a pixel in turn
    bits = []
    for d in diffs.tolist():
        size = abs(d).bit_length()
        bits.append(format(size, "04b"))  # a 4-bit Huffman code per size category 0..9
        if size:
            bits.append(format(d if d > 0 else d + (1 << size) - 1, f"0{size}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")
    components = b"".join(bytes([i + 1, 0x11, 0]) for i in range(channels))
    frame = struct.pack(">BHHB", 8, h, w, channels) + components
    table = bytes([0x00]) + bytes([0, 0, 0, 10] + [0] * 12) + bytes(range(10))
    scan = bytes([channels]) + b"".join(bytes([i + 1, 0x00]) for i in range(channels)) + b"\x01\x00\x00"

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body

    return (b"\xff\xd8" + segment(0xC3, frame) + segment(0xC4, table) + segment(0xDA, scan)
            + data + b"\xff\xd9")


# --- damaged -----------------------------------------------------------------------------------

def heic_with_broken_tile(array: np.ndarray, broken: int = 5, tile: int = 128) -> bytes:
    """A grid HEIC whose tile number `broken` (from 0) is overwritten with zeros (libde265
    decodes it into a gray patch without a word)."""
    from pipeline.imageinfo import heif

    data = bytearray(heic_grid(array, tile))
    meta = heif._read_meta(bytes(data))
    offset, length = meta.extents[meta.tiles[meta.primary][broken]][0]
    data[offset:offset + length] = bytes(length)
    return bytes(data)


def avif_with_bad_header(array: np.ndarray) -> bytes:
    """An AVIF whose image size property (ispe) is gone: its header no longer says the size."""
    data = bytearray(avif(array))
    at = data.index(b"ispe")
    data[at:at + 4] = b"free"
    return bytes(data)


def tiff_strip_bomb(strips: int = 50_000_000) -> bytes:
    """A 64x64 TIFF declaring `strips` strips (a reader would allocate their tables)."""
    data = bytearray(tiff_raw(np.zeros((64, 64), np.uint8)))
    for tag in (273, 279):  # StripOffsets, StripByteCounts: their count field
        at = data.index(struct.pack("<HH", tag, 4))
        data[at + 4:at + 8] = struct.pack("<I", strips)
    return bytes(data)


def tiff_header_only(width: int, height: int) -> bytes:
    """A TIFF whose IFD claims width x height (a bomb by its size), with 1 byte of pixels."""
    data = bytearray(tiff_raw(np.zeros((1, 1), np.uint8)))
    for tag, value in ((256, width), (257, height), (278, height)):
        at = data.index(struct.pack("<HH", tag, 4))
        data[at + 8:at + 12] = struct.pack("<I", value)
    return bytes(data)


def mp4_header() -> bytes:
    """The start of an MP4 video: an ISO media file like HEIF, of another brand."""
    return struct.pack(">I", 24) + b"ftypisom" + b"\x00\x00\x02\x00isomiso2" + bytes(100)
