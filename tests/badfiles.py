"""The inputs a real image dump holds -- broken, odd and perfectly fine -- generated from real
photos, with what the labeler must make of each.

Every `Case` writes one entry under an input folder and names the expected outcome: "ok"
(labeled) or the `error_kind` of its error row. Byte generators (`truncated`, `cmyk_jpeg`,
`png_header_only`, ...) are public so tests and scripts can build their own mixes. Usable
outside pytest (a chaos or bench script): `sys.path.insert(0, "tests"); import badfiles`.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import formatfiles as ff
from conftest import skimage_photo

OK = "ok"


# --- encoders ----------------------------------------------------------------------------------

def pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array)


def encode(image, fmt: str, **kw) -> bytes:
    """A PIL image (or an array) encoded by Pillow."""
    buf = io.BytesIO()
    (pil(image) if isinstance(image, np.ndarray) else image).save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(array: np.ndarray, **kw) -> bytes:
    return encode(array, "JPEG", quality=kw.pop("quality", 92), **kw)


def png(array: np.ndarray, **kw) -> bytes:
    return encode(array, "PNG", **kw)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_raw(array: np.ndarray, bit_depth: int = 8) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): gray, RGB or RGBA by shape."""
    array = array if array.ndim == 3 else array[..., None]
    h, w, channels = array.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    dtype = ">u2" if bit_depth == 16 else "u1"
    rows = b"".join(b"\x00" + array[y].astype(dtype).tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def to_16bit(array: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint16 whose high byte is `array` and low byte is noise (so v >> 8 gives `array` back)."""
    noise = np.random.default_rng(seed).integers(0, 256, array.shape)
    return array.astype(np.uint16) * 256 + noise.astype(np.uint16)


# --- odd but good ------------------------------------------------------------------------------

def cmyk_jpeg(array: np.ndarray) -> bytes:
    return encode(pil(array).convert("CMYK"), "JPEG", quality=95)  # Adobe APP14, inverted CMYK


def grayscale_jpeg(array: np.ndarray) -> bytes:
    return encode(pil(array).convert("L"), "JPEG", quality=92)


def progressive_jpeg(array: np.ndarray) -> bytes:
    return jpeg(array, progressive=True)


# What PIL's exif_transpose does for each orientation, and its inverse (to build the stored image)
_TRANSPOSE = {2: ("FLIP_LEFT_RIGHT", "FLIP_LEFT_RIGHT"), 3: ("ROTATE_180", "ROTATE_180"),
              4: ("FLIP_TOP_BOTTOM", "FLIP_TOP_BOTTOM"), 5: ("TRANSPOSE", "TRANSPOSE"),
              6: ("ROTATE_270", "ROTATE_90"), 7: ("TRANSVERSE", "TRANSVERSE"),
              8: ("ROTATE_90", "ROTATE_270")}


def exif_oriented_jpeg(upright: np.ndarray, orientation: int = 6, quality: int = 95) -> bytes:
    """A JPEG stored sideways (as a phone does) with the EXIF tag that turns it back upright:
    a viewer honouring the tag shows `upright`."""
    from PIL import Image

    image = pil(upright)
    if orientation != 1:
        image = image.transpose(getattr(Image.Transpose, _TRANSPOSE[orientation][1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=quality, exif=exif, subsampling=0 if quality >= 95 else -1)


def jpeg_with_big_metadata(array: np.ndarray, metadata_bytes: int = 200_000) -> bytes:
    """The frame header comes after 64 KiB (big ICC profile, as some cameras and Photoshop write)."""
    profile = bytes(np.random.default_rng(1).integers(0, 256, metadata_bytes, np.uint8))
    return jpeg(array, icc_profile=profile)


def jpeg_with_trailer(array: np.ndarray, trailer: bytes = b"MOTION-PHOTO" * 1000) -> bytes:
    """Bytes after the end-of-image marker (camera trailers, motion photos) are still an image."""
    return jpeg(array) + trailer


def palette_png_with_transparency(array: np.ndarray) -> bytes:
    image = pil(array).convert("P", palette=1, colors=64)  # 1 = Palette.ADAPTIVE
    return encode(image, "PNG", transparency=0)


def rgba_png(array: np.ndarray) -> bytes:
    alpha = np.full(array.shape[:2], 128, np.uint8)
    alpha[: array.shape[0] // 4] = 0
    return png(np.dstack([array, alpha]))


def animated_gif(frames: list[np.ndarray]) -> bytes:
    images = [pil(f) for f in frames]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)


def gif_frame_larger_than_screen(array: np.ndarray, screen=(10, 10)) -> bytes:
    """A header that lies small: the logical screen is tiny, the frame is the whole photo."""
    data = bytearray(encode(array, "GIF"))
    data[6:10] = struct.pack("<HH", *screen)
    return bytes(data)


def bmp(array: np.ndarray, mode: str = "RGB") -> bytes:
    return encode(pil(array).convert(mode), "BMP")


def bmp_top_down(array: np.ndarray) -> bytes:
    """Negative height: rows stored top to bottom."""
    data = bytearray(bmp(array))
    pixels_at, = struct.unpack("<I", data[10:14])
    width, height = struct.unpack("<ii", data[18:26])
    row = (width * 3 + 3) // 4 * 4
    rows = [data[pixels_at + i * row: pixels_at + (i + 1) * row] for i in range(height)]
    data[22:26] = struct.pack("<i", -height)
    return bytes(data[:pixels_at]) + b"".join(reversed(rows))


def webp(array: np.ndarray, **kw) -> bytes:
    return encode(array, "WEBP", **({"quality": 90} | kw))


def webp_with_alpha(array: np.ndarray) -> bytes:
    alpha = np.full(array.shape[:2], 255, np.uint8)
    alpha[: array.shape[0] // 3] = 0
    return webp(np.dstack([array, alpha]))  # VP8X + ALPH + VP8


def animated_webp(frames: list[np.ndarray], **kw) -> bytes:
    images = [pil(f) for f in frames]
    return encode(images[0], "WEBP", save_all=True, append_images=images[1:], duration=100,
                  **({"quality": 90} | kw))


def heic_header() -> bytes:
    return struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + bytes(100)


# --- broken ------------------------------------------------------------------------------------

def truncated(data: bytes, fraction: float = 0.6) -> bytes:
    return data[: int(len(data) * fraction)]


def random_bytes(n: int = 20_000, seed: int = 7) -> bytes:
    data = bytes(np.random.default_rng(seed).integers(0, 256, n, np.uint8))
    return b"\x00" + data[1:]  # no image signature starts with a zero byte


def jpeg_soi_then_garbage(n: int = 20_000) -> bytes:
    return b"\xff\xd8\xff\xe0" + random_bytes(n)[4:]


HTML_ERROR_PAGE = (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
                   b"<body><h1>Not Found</h1><p>The requested URL was not found.</p></body></html>\n")
TEXT_FILE = b"This is not an image.\nIt is a note someone saved with a .jpg name.\n"


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)


def jpeg_header_only(width: int, height: int, precision: int = 8, sof: int = 0xC0) -> bytes:
    """SOI, a JFIF APP0 and a frame header claiming width x height, and no scan data."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    components = b"".join(bytes([i, 0x11, 0]) for i in (1, 2, 3))
    frame = struct.pack(">BHHB", precision, height, width, 3) + components
    return b"\xff\xd8" + app0 + bytes([0xFF, sof]) + struct.pack(">H", 2 + len(frame)) + frame + b"\xff\xd9"


def gif_header_only(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF whose logical screen is `screen` and whose first frame claims `frame`."""
    lsd = struct.pack("<HHBBB", *screen, 0x80, 0, 0) + bytes(6)  # 2-color global table
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return b"GIF89a" + lsd + descriptor + b"\x02\x02\x4c\x01\x00\x3b"


# --- the catalogue -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str  # path under the input folder = the image_id (None-UTF-8 names: see NON_UTF8_NAME)
    expect: str  # OK or the error_kind of the row
    write: Callable[[Path], None]  # creates the entry at the given path
    why: str = ""


def _bytes(data_fn: Callable[[], bytes]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(data_fn())
    return write


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _symlink(target: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        os.symlink(target, path)
    return write


def _sparse(size: int) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(size)  # sparse: no disk space used
    return write


NON_UTF8_NAME = os.fsdecode(b"caf\xe9-latin1.jpg")  # written with surrogate escapes
NON_UTF8_ID = "caf\\xe9-latin1.jpg"  # how it appears in the output


def cases() -> list[Case]:
    """Every case the labeler must handle; files are generated when written."""
    cat = lambda: skimage_photo("chelsea")  # noqa: E731  (real photos, generated lazily)
    coffee = lambda: skimage_photo("coffee")  # noqa: E731
    rocket = lambda: skimage_photo("rocket")  # noqa: E731
    small = lambda: np.ascontiguousarray(cat()[::2, ::2])  # noqa: E731  (226x150: quick HEIC/AVIF)
    b = _bytes
    return [
        # good, in odd shapes
        Case("png_named.jpg", OK, b(lambda: png(cat())), "a PNG with a .jpg name"),
        Case("cmyk.jpg", OK, b(lambda: cmyk_jpeg(cat()))),
        Case("grayscale.jpg", OK, b(lambda: grayscale_jpeg(coffee()))),
        Case("progressive.jpg", OK, b(lambda: progressive_jpeg(coffee()))),
        Case("exif_upright.jpg", OK, b(lambda: exif_oriented_jpeg(cat(), 1))),
        Case("exif_orientation_6.jpg", OK, b(lambda: exif_oriented_jpeg(cat(), 6)),
             "stored sideways; must be labeled like exif_upright.jpg"),
        Case("big_metadata.jpg", OK, b(lambda: jpeg_with_big_metadata(rocket())),
             "frame header after 64 KiB"),
        Case("trailer.jpg", OK, b(lambda: jpeg_with_trailer(rocket())), "bytes after EOI"),
        Case("png16_rgb.png", OK, b(lambda: png_raw(to_16bit(coffee()), 16))),
        Case("png16_gray.png", OK, b(lambda: png_raw(to_16bit(coffee()[..., 1]), 16))),
        Case("palette_transparency.png", OK, b(lambda: palette_png_with_transparency(cat()))),
        Case("rgba.png", OK, b(lambda: rgba_png(cat()))),
        Case("animated.gif", OK, b(lambda: animated_gif([cat(), cat()[::-1].copy()]))),
        Case("gif_frame_larger_than_screen.gif", OK, b(lambda: gif_frame_larger_than_screen(cat()))),
        Case("bmp24.bmp", OK, b(lambda: bmp(cat()))),
        Case("bmp32.bmp", OK, b(lambda: bmp(cat(), "RGBA"))),
        Case("bmp_gray8.bmp", OK, b(lambda: bmp(cat(), "L"))),
        Case("bmp_top_down.bmp", OK, b(lambda: bmp_top_down(cat()))),
        Case("bmp_trailing_bytes.bmp", OK, b(lambda: bmp(cat()) + b"\x00\x00")),
        Case("webp_lossy.webp", OK, b(lambda: webp(cat()))),
        Case("webp_lossless.webp", OK, b(lambda: webp(cat(), lossless=True))),
        Case("webp_alpha.webp", OK, b(lambda: webp_with_alpha(cat()))),
        Case("webp_animated.webp", OK, b(lambda: animated_webp([cat(), cat()[::-1].copy()]))),
        Case("one_pixel.png", OK, b(lambda: png(cat()[:1, :1]))),
        Case("one_pixel.jpg", OK, b(lambda: jpeg(cat()[:1, :1]))),
        Case("wide_10000x10.png", OK, b(lambda: png(np.resize(cat(), (10, 10000, 3))))),
        Case("tall_10x10000.jpg", OK, b(lambda: jpeg(np.resize(cat(), (10000, 10, 3))))),
        Case("ünïcødé 猫 photo.jpg", OK, b(lambda: jpeg(cat()))),
        Case("sub dir/with spaces.png", OK, b(lambda: png(coffee()))),
        Case(NON_UTF8_NAME, OK, b(lambda: jpeg(coffee())), "file name is not UTF-8"),
        Case("link_to_good.jpg", OK, _symlink("bmp24.bmp")),
        # decoded by Pillow (+ pillow-heif), not TensorFlow
        Case("heic.heic", OK, b(lambda: ff.heic(cat()))),
        Case("heic_named.jpg", OK, b(lambda: ff.heic(small())), "the content decides"),
        Case("heic_grid.heic", OK, b(lambda: ff.heic_grid(cat())), "tiles, as iPhones write"),
        Case("avif.avif", OK, b(lambda: ff.avif(cat()))),
        Case("tiff_lzw.tif", OK, b(lambda: ff.tiff(cat(), compression="tiff_lzw"))),
        Case("tiff_cmyk.tif", OK, b(lambda: ff.tiff(cat(), "CMYK"))),
        Case("tiff_16bit.tif", OK, b(lambda: ff.tiff_raw(to_16bit(coffee())))),
        Case("tiff_pages.tif", OK, b(lambda: ff.tiff_pages([cat(), coffee()]))),
        Case("jpeg_lossless.jpg", OK, b(lambda: ff.lossless_jpeg(cat()[:96, :128]))),
        Case("bmp_palette8.bmp", OK, b(lambda: bmp(cat(), "P")),
             "TF would read palette indexes as gray"),
        Case("bmp_1bit.bmp", OK, b(lambda: bmp(cat(), "1"))),
        Case("bmp_rle8.bmp", OK, b(lambda: ff.bmp_rle8(cat()))),
        # broken
        Case("truncated.jpg", "corrupt", b(lambda: truncated(jpeg(cat()), 0.6))),
        Case("truncated_tail.jpg", "corrupt", b(lambda: truncated(jpeg(cat()), 0.97)),
             "TF's cropped decoder alone would label it"),
        Case("truncated_progressive.jpg", "corrupt", b(lambda: truncated(progressive_jpeg(cat()), 0.9))),
        Case("truncated.png", "corrupt", b(lambda: truncated(png(cat()), 0.6))),
        Case("truncated.gif", "corrupt", b(lambda: truncated(encode(cat(), "GIF"), 0.5))),
        Case("truncated.webp", "corrupt", b(lambda: truncated(webp(cat()), 0.5))),
        Case("truncated.bmp", "corrupt", b(lambda: truncated(bmp(cat()), 0.5))),
        Case("zero_bytes.jpg", "empty_file", b(lambda: b"")),
        Case("text.jpg", "unsupported_format", b(lambda: TEXT_FILE)),
        Case("html_error_page.jpg", "unsupported_format", b(lambda: HTML_ERROR_PAGE)),
        Case("random_bytes.jpg", "unsupported_format", b(random_bytes)),
        Case("jpeg_soi_then_garbage.jpg", "corrupt", b(jpeg_soi_then_garbage)),
        Case("heic_header_only.heic", "corrupt", b(heic_header)),
        Case("truncated.heic", "corrupt", b(lambda: truncated(ff.heic(small()), 0.6))),
        Case("heic_broken_tile.heic", "corrupt",
             b(lambda: ff.heic_with_broken_tile(small(), tile=64)),
             "libde265 decodes it to a gray patch without a word"),
        Case("avif_bad_header.avif", "corrupt", b(lambda: ff.avif_with_bad_header(small()))),
        Case("truncated.avif", "corrupt", b(lambda: truncated(ff.avif(small()), 0.6))),
        Case("truncated.tif", "corrupt", b(lambda: truncated(ff.tiff(cat()), 0.6))),
        Case("video.mp4.jpg", "unsupported_format", b(ff.mp4_header)),
        Case("jpeg_12bit.jpg", "unsupported_format", b(lambda: jpeg_header_only(64, 64, precision=12))),
        Case("jpeg_lossless16.jpg", "unsupported_format",
             b(lambda: jpeg_header_only(64, 64, precision=16, sof=0xC3))),
        Case("tiff_strip_bomb.tif", "too_large", b(ff.tiff_strip_bomb), "50M strips, 64x64"),
        Case("bomb_50000x50000.tif", "too_large", b(lambda: ff.tiff_header_only(50_000, 50_000))),
        Case("bomb_50000x50000.png", "too_large", b(lambda: png_header_only(50_000, 50_000))),
        Case("bomb_50000x50000.jpg", "too_large", b(lambda: jpeg_header_only(50_000, 50_000))),
        Case("bomb_gif_frame.gif", "too_large", b(lambda: gif_header_only((1, 1), (50_000, 50_000))),
             "1x1 screen, 50000x50000 frame"),
        Case("huge_2GiB.jpg", "too_large", _sparse(2 * 2**30), "above --max-file-bytes; never read"),
        # hostile JPEGs, refused from their structure before decoding
        Case("scans_10000.jpg", "too_large", b(lambda: jpeg_with_scans(cat(), 10_000)),
             "each scan is a decoding pass: minutes of CPU"),
        Case("frame_9000x9000_2kB.jpg", "corrupt", b(jpeg_frame_without_data),
             "a 1 GB decode of 2 kB of data"),
        Case("hole_4KiB_at_50.jpg", "corrupt", b(lambda: zero_hole(jpeg(cat()), 0.5)),
             "a lost 4 KiB block: zeros in the middle of the image data"),
        Case("cut_50_end_marker.jpg", "corrupt", b(lambda: cut_with_end_marker(jpeg(cat()), 0.5)),
             "TF decodes it, the rest gray"),
        Case("cut_90_progressive_end_marker.jpg", "corrupt",
             b(lambda: cut_with_end_marker(progressive_jpeg(cat()), 0.9))),
        Case("exif_long_orientation_6.jpg", OK,
             b(lambda: jpeg_with_exif_segments(np.ascontiguousarray(np.rot90(cat(), 1)),
                                               [exif_block(6, 4)])), "orientation stored as LONG"),
        # not files
        Case("fifo.jpg", "unreadable", _fifo, "reading a FIFO blocks forever"),
        Case("dev_zero.jpg", "unreadable", _symlink("/dev/zero"), "reading never ends"),
        Case("broken_link.jpg", "not_found", _symlink("does-not-exist.jpg")),
        Case("link_loop_a.jpg", "unreadable", _symlink("link_loop_b.jpg")),
        Case("link_loop_b.jpg", "unreadable", _symlink("link_loop_a.jpg")),
    ]


def write_cases(directory: Path, selected: list[Case] | None = None) -> dict[str, str]:
    """Write the cases (all by default) plus a directory symlink loop (which gets no row);
    return {image_id: expected outcome}."""
    from pipeline.types import printable

    directory.mkdir(parents=True, exist_ok=True)
    expected = {}
    for case in cases() if selected is None else selected:
        path = directory / case.name
        path.parent.mkdir(parents=True, exist_ok=True)
        case.write(path)
        expected[printable(case.name)] = case.expect
    loop = directory / "sub dir" / "loop"
    loop.parent.mkdir(exist_ok=True)
    if not os.path.lexists(loop):
        os.symlink("..", loop)  # walking it would never end
    return expected


def case(name: str) -> Case:
    return next(c for c in cases() if c.name == name)


# --- hostile JPEGs (structure) -----------------------------------------------------------------

def _jpeg_segments_until_eoi(data: bytes) -> tuple[bytes, bytes]:
    """(everything before the final end-of-image marker, the marker and what follows)."""
    end = data.rindex(b"\xff\xd9")
    return data[:end], data[end:]


def _eobrun_scan(component: int, blocks: int, table: int = 3) -> bytes:
    """A progressive AC scan of coefficient 63 of one component that codes nothing: end-of-band
    runs (EOB14 + 14 bits, 32767 blocks each). Tiny, yet libjpeg passes over every block."""
    bits, left = [], blocks
    while left > 0:
        run = min(left, 32767)
        bits += [0] + [int(b) for b in format(run - 2**14, "014b")] if run >= 2**14 else []
        if run < 2**14:  # a short run: EOBr with r = bit length - 1
            r = run.bit_length() - 1
            bits += _short_eob_code(r) + [int(b) for b in format(run - 2**r, f"0{r}b")][:r] if r else _short_eob_code(0)
        left -= run
    bits += [1] * (-len(bits) % 8)
    raw = bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))
    data = raw.replace(b"\xff", b"\xff\x00")
    header = struct.pack(">BBBBBB", 1, component, table, 63, 63, 0)
    return b"\xff\xda" + struct.pack(">H", 2 + len(header)) + header + data


# The AC Huffman table of the crafted scans: EOB14 (symbol 0xE0) is "0"; EOB0..EOB13 (0x00,
# 0x10, ... 0xD0) get the codes "1" + 4 bits.
_EOB_SYMBOLS = [0xE0] + [r << 4 for r in range(14)]


def _short_eob_code(r: int) -> list[int]:
    return [1] + [int(b) for b in format(r, "04b")]


def _eob_table(table: int = 3) -> bytes:
    counts = [1, 0, 0, 0, 14] + [0] * 11  # one 1-bit code, fourteen 5-bit codes
    payload = bytes([0x10 | table]) + bytes(counts) + bytes(_EOB_SYMBOLS)
    return b"\xff\xc4" + struct.pack(">H", 2 + len(payload)) + payload


def jpeg_with_scans(array: np.ndarray, scans: int = 10_000) -> bytes:
    """A progressive JPEG of the photo followed by extra tiny scans (end-of-band runs over the
    last chroma component) up to `scans` in all: a few bytes each, yet libjpeg passes over every
    block for each scan, so 10,000 scans of a 12-megapixel photo take minutes of CPU."""
    data = progressive_jpeg(array)
    body, end = _jpeg_segments_until_eoi(data)
    height, width = array.shape[:2]
    chroma_blocks = -(-width // 16) * -(-height // 16)  # 4:2:0, Pillow's default
    extra = scans - 10  # Pillow's (libjpeg's) progressive script has 10 scans for color
    return body + _eob_table() + _eobrun_scan(3, chroma_blocks) * extra + end


def jpeg_frame_without_data(width: int = 9000, height: int = 9000, data_bytes: int = 2048) -> bytes:
    """A baseline frame header promising width x height, then only `data_bytes` of entropy-coded
    data and an end marker: libjpeg fills the rest with gray after a full-size decode."""
    small = jpeg(np.full((64, 64, 3), 120, np.uint8))
    sof = small.index(b"\xff\xc0")
    forged = bytearray(small)
    forged[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    sos = forged.index(b"\xff\xda")
    scan_header_end = sos + 2 + struct.unpack(">H", forged[sos + 2:sos + 4])[0]
    noise = random_bytes(data_bytes, seed=3).replace(b"\xff", b"\x7f")
    return bytes(forged[:scan_header_end]) + noise + b"\xff\xd9"


def ends_in_a_zero_bit(data: bytes) -> bool:
    """A JPEG's entropy-coded data ends (before FF D9) in a 0 bit: no encoder padding, so the
    file looks cut to imageinfo (about 1 intact file in 8 does). A stuffed FF 00 ends in 1s."""
    return data.endswith(b"\xff\xd9") and data[-4:-2] != b"\xff\x00" and not data[-3] & 1


def cut_with_end_marker(data: bytes, fraction: float) -> bytes:
    """A file cut short, then given an end-of-image marker (what a careless repair tool or a
    partial download that is 'fixed up' leaves): TF decodes it without a word."""
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


def zero_hole(data: bytes, fraction: float, size: int = 4096) -> bytes:
    """`size` bytes of zeros from the 512-byte sector at `fraction` of the file (not past its
    last 2 bytes), as a lost disk or network block leaves a file: its length is unchanged."""
    start = int(len(data) * fraction) // 512 * 512
    end = min(start + size, len(data) - 2)
    return data[:start] + bytes(end - start) + data[end:]


def jpeg_with_restart_markers(array: np.ndarray, interval_rows: int = 1) -> bytes:
    """A baseline JPEG with a restart marker after every `interval_rows` MCU row (cameras)."""
    return jpeg(array, restart_marker_rows=interval_rows)


# --- EXIF as some tools write it ---------------------------------------------------------------

def exif_block(orientation: int, type_code: int = 3) -> bytes:
    """A minimal big-endian EXIF APP1 payload whose IFD0 holds only the orientation tag, stored
    with the given TIFF type (3 SHORT as cameras write it, 4 LONG as some tools do)."""
    size = {1: 1, 3: 2, 4: 4, 6: 1, 8: 2, 9: 4}[type_code]
    value = orientation.to_bytes(size, "big").ljust(4, b"\x00")
    ifd = struct.pack(">H", 1) + struct.pack(">HHI", 0x0112, type_code, 1) + value + bytes(4)
    return b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd


def jpeg_with_exif_segments(stored: np.ndarray, blocks: list[bytes]) -> bytes:
    """A JPEG of `stored` with one APP1 segment per EXIF block, in order, right after SOI."""
    data = jpeg(stored, quality=95, subsampling=0)
    app1 = b"".join(b"\xff\xe1" + struct.pack(">H", 2 + len(b)) + b for b in blocks)
    return data[:2] + app1 + data[2:]


# --- weights files -----------------------------------------------------------------------------

class TensorSpec:
    """One tensor of a crafted legacy .pth: a view (offset, shape, stride) of a storage."""

    def __init__(self, storage: str, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


def legacy_pth(tensors: dict, storages: dict[str, np.ndarray], state=None, keys=None) -> bytes:
    """A PyTorch legacy-format file written without torch: pickled magic, protocol, sys info,
    the state dict (tensors as torch._utils._rebuild_tensor_v2 calls on storages referenced by
    persistent id), the storage keys, then each storage's element count and float32 bytes.
    `state` / `keys` replace what is pickled there (to craft malformed files)."""
    import pickle
    import sys
    import types

    class _Storage:
        def __init__(self, key):
            self.key = key

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", fake_torch.FloatStorage, obj.key, "cpu", storages[obj.key].size)
            return None

    fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only pickled by reference
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    fake_torch.FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    fake_torch._utils = fake_utils

    class _Tensor:
        def __init__(self, spec):
            self.spec = spec

        def __reduce__(self):
            s = self.spec
            return (_rebuild_tensor_v2, (_Storage(s.storage), s.offset, s.shape, s.stride, False, {}))

    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": fake_torch, "torch._utils": fake_utils})
    try:
        buf = io.BytesIO()
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(obj, buf, protocol=2)
        _Pickler(buf, protocol=2).dump(
            {n: _Tensor(t) for n, t in tensors.items()} if state is None else state)
        pickle.dump(list(storages) if keys is None else keys, buf, protocol=2)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    for array in storages.values():
        buf.write(struct.pack("<q", array.size) + array.astype("<f4").tobytes())
    return buf.getvalue()


def crafted_weights() -> dict[str, bytes]:
    """Malformed weights files, each of which once crashed or misled the loader."""
    storage = {"0": np.arange(16, dtype=np.float32)}
    return {
        "huge_stride": legacy_pth({"w": TensorSpec("0", 0, (4, 4), (2**40, 1))}, storage),
        "negative_offset": legacy_pth({"w": TensorSpec("0", -4096, (4, 4), (4, 1))}, storage),
        "past_the_end": legacy_pth({"w": TensorSpec("0", 8, (4, 4), (4, 1))}, storage),
        "missing_storage": legacy_pth({"w": TensorSpec("0", 0, (4, 4), (4, 1))}, storage, keys=[]),
        "state_not_a_dict": legacy_pth({}, storage, state=[1, 2, 3]),
    }


def slow_but_valid_jpeg(side: int = 8000) -> bytes:
    """A JPEG every check accepts that still takes seconds of CPU to decode: a big progressive
    photo (under --max-pixels) with as many scans as the reader allows (MAX_JPEG_SCANS)."""
    photo = skimage_photo("chelsea")
    reps = (-(-side // photo.shape[0]), -(-side // photo.shape[1]), 1)
    return jpeg_with_scans(np.ascontiguousarray(np.tile(photo, reps)[:side, :side]), 100)
