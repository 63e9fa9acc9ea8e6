"""Header parsing: format, size, orientation and the refusals, on real encoded files."""
import io
import struct

import numpy as np
import pytest

import badfiles as bf
import formatfiles as ff
from conftest import skimage_photo
from pipeline import imageinfo
from pipeline.imageinfo import HEAD_BYTES, ImageError, NeedMoreBytes, inspect, prepare, probe

CAT = skimage_photo("chelsea")  # 451x300
MAX = 90_000_000


def kind_of(data: bytes, max_pixels: int = MAX) -> str:
    try:
        inspect(data, len(data), max_pixels)
    except ImageError as e:
        assert str(e)  # always a message for people
        return e.kind
    return "ok"


@pytest.mark.parametrize("make, fmt", [
    (lambda a: bf.jpeg(a), "jpeg"),
    (bf.progressive_jpeg, "jpeg"),
    (bf.cmyk_jpeg, "jpeg"),
    (bf.grayscale_jpeg, "jpeg"),
    (lambda a: bf.png(a), "png"),
    (lambda a: bf.png_raw(bf.to_16bit(a), 16), "png"),
    (bf.palette_png_with_transparency, "png"),
    (lambda a: bf.encode(a, "GIF"), "gif"),
    (lambda a: bf.bmp(a), "bmp"),
    (bf.bmp_top_down, "bmp"),
    (lambda a: bf.bmp(a, "L"), "bmp"),
    (lambda a: bf.webp(a), "webp"),
    (lambda a: bf.webp(a, lossless=True), "webp"),
    (bf.webp_with_alpha, "webp"),
])
def test_format_and_size_of_good_images(make, fmt):
    info = probe(make(CAT))
    assert (info.format, info.width, info.height, info.orientation) == (fmt, 451, 300, 1)


def test_webp_header_variants():
    lossy, lossless, alpha = bf.webp(CAT), bf.webp(CAT, lossless=True), bf.webp_with_alpha(CAT)
    animated = bf.animated_webp([CAT, CAT[::-1].copy()])
    assert [d[12:16] for d in (lossy, lossless, alpha, animated)] == [b"VP8 ", b"VP8L", b"VP8X", b"VP8X"]
    assert not probe(alpha).prepare  # a still image goes to TF as it is
    info = probe(animated)
    assert (info.width, info.height, info.prepare) == (451, 300, True)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_read_and_size_is_as_stored(orientation):
    from PIL import Image, ImageOps

    data = bf.exif_oriented_jpeg(CAT, orientation)
    info = probe(data)
    assert info.orientation == orientation
    sideways = orientation >= 5
    assert (info.width, info.height) == ((300, 451) if sideways else (451, 300))
    # the fixture is right: a viewer honouring the tag shows the upright photo
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert shown.shape == CAT.shape and np.abs(shown.astype(int) - CAT).mean() < 3


def test_frame_header_after_64k_asks_for_the_whole_file():
    data = bf.jpeg_with_big_metadata(CAT)  # 200 kB of ICC profile before the frame header
    with pytest.raises(NeedMoreBytes):
        probe(data[:HEAD_BYTES], len(data))
    assert (probe(data).width, probe(data).height) == (451, 300)
    assert inspect(data, len(data), MAX).width == 451


def test_truncated_jpeg_is_corrupt_but_bytes_after_the_end_are_fine():
    whole = bf.jpeg(CAT)
    assert kind_of(whole) == "ok"
    assert kind_of(bf.truncated(whole, 0.97)) == "corrupt"
    assert kind_of(bf.truncated(bf.progressive_jpeg(CAT), 0.9)) == "corrupt"
    assert kind_of(bf.jpeg_with_trailer(CAT)) == "ok"
    # the usual case needs only the head and the last two bytes
    assert inspect(whole[:HEAD_BYTES], len(whole), MAX, tail=whole[-2:]).format == "jpeg"
    cut = bf.truncated(whole, 0.9)
    with pytest.raises(NeedMoreBytes):
        inspect(cut[:HEAD_BYTES // 4], len(cut), MAX, tail=cut[-2:])


@pytest.mark.parametrize("data, kind, words", [
    (b"", "empty_file", "empty"),
    (bf.TEXT_FILE, "unsupported_format", "plain text"),
    (bf.HTML_ERROR_PAGE, "unsupported_format", "HTML"),
    (bf.random_bytes(), "unsupported_format", "unknown file signature"),
    (bf.jpeg_soi_then_garbage(), "corrupt", "JPEG header"),
    (bf.heic_header(), "corrupt", "HEIF header is truncated"),
    (ff.mp4_header(), "unsupported_format", "MP4"),
    (bf.jpeg_header_only(64, 64, precision=12), "unsupported_format", "12-bit JPEG"),
    (bf.jpeg_header_only(64, 64, precision=16, sof=0xC3), "unsupported_format", "16-bit lossless"),
    (bf.jpeg_header_only(64, 64, sof=0xC7), "unsupported_format", "hierarchical"),
    (bf.png_header_only(50_000, 50_000), "too_large", "2500.0 megapixels"),
    (bf.jpeg_header_only(50_000, 50_000), "too_large", "--max-pixels"),
    (bf.png_header_only(0, 10), "corrupt", "invalid size"),
    (bf.png_header_only(10, 10)[:20], "corrupt", "truncated"),
])
def test_refusals_name_a_kind_and_a_reason(data, kind, words):
    with pytest.raises(ImageError, match=words) as info:
        inspect(data, len(data), MAX)
    assert info.value.kind == kind


def test_max_pixels_is_a_limit_on_width_times_height():
    data = bf.png(CAT)
    assert kind_of(data, max_pixels=451 * 300) == "ok"
    assert kind_of(data, max_pixels=451 * 300 - 1) == "too_large"


def test_bmp_that_tf_would_misread_goes_to_pillow():
    for data in (bf.bmp(CAT, "P"), bf.bmp(CAT, "1"), ff.bmp_rle8(CAT)):
        info = probe(data)
        assert info.pillow and (info.width, info.height) == (451, 300)
    os2 = bytearray(bf.bmp(CAT))
    os2[14:18] = struct.pack("<I", 12)  # an OS/2 header: 16-bit sizes
    os2[18:22] = struct.pack("<HH", 451, 300)
    assert probe(bytes(os2)).pillow
    embedded = bytearray(bf.bmp(CAT))
    embedded[30:34] = struct.pack("<I", 5)  # BI_PNG: neither decoder reads it
    with pytest.raises(ImageError, match="PNG image is not supported") as info:
        probe(bytes(embedded))
    assert info.value.kind == "unsupported_format" and info.value.width == 451


def test_bmp_variants_tf_reads_right():
    for data in (bf.bmp(CAT), bf.bmp(CAT, "RGBA"), bf.bmp(CAT, "L"), bf.bmp_top_down(CAT)):
        assert kind_of(data) == "ok" and not probe(data).prepare and not probe(data).pillow
    assert kind_of(bf.truncated(bf.bmp(CAT), 0.5)) == "corrupt"


def test_bmp_trailing_bytes_are_trimmed():
    exact = bf.bmp(CAT)
    padded = exact + b"\x00\x00"
    info = probe(padded)
    assert info.prepare
    assert prepare(padded, info, MAX) == exact


def test_gif_is_cut_to_its_first_frame():
    from PIL import Image

    other = skimage_photo("coffee")[:300, :451]
    data = bf.animated_gif([CAT, other, CAT])
    info = probe(data)
    assert info.prepare
    first = prepare(data, info, MAX)
    image = Image.open(io.BytesIO(first))
    assert image.n_frames == 1 and len(first) < len(data) / 2
    original = Image.open(io.BytesIO(data))
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(original.convert("RGB")))


def test_gif_frame_is_checked_not_only_its_screen():
    bomb = bf.gif_header_only((1, 1), (50_000, 50_000))
    info = probe(bomb)
    assert (info.width, info.height) == (1, 1)  # the screen lies
    with pytest.raises(ImageError, match="first frame reaches 50000x50000") as e:
        prepare(bomb, info, MAX)
    assert e.value.kind == "too_large"
    small_screen = bf.gif_frame_larger_than_screen(CAT)
    assert prepare(small_screen, probe(small_screen), MAX)  # 451x300 frame: fine


def test_damaged_gif_structure_is_corrupt():
    cut = bf.truncated(bf.encode(CAT, "GIF"), 0.5)
    with pytest.raises(ImageError, match="ends inside the first frame") as e:
        prepare(cut, probe(cut), MAX)
    assert e.value.kind == "corrupt"
    no_image = bf.gif_header_only((10, 10), (10, 10))
    no_image = no_image[:19] + b"\x3b"  # header, screen, color table, then the trailer
    with pytest.raises(ImageError, match="no image"):
        prepare(no_image, probe(no_image), MAX)


def test_animated_webp_is_flagged_rgba_for_tf():
    data = bf.animated_webp([CAT, CAT[::-1].copy()])
    fixed = prepare(data, probe(data), MAX)
    assert len(fixed) == len(data) and fixed[20] == data[20] | 0x10


def test_damage_explains_truncated_png_and_webp():
    png = bf.truncated(bf.png(CAT), 0.6)
    assert "IEND" in imageinfo.damage(png, probe(png))
    webp = bf.truncated(bf.webp(CAT), 0.5)
    assert "bytes are missing" in imageinfo.damage(webp, probe(webp))
    whole = bf.png(CAT)
    assert imageinfo.damage(whole, probe(whole)) is None


# --- hostile JPEGs: refused from their structure, before any decoding ---------------------------

def test_a_jpeg_with_thousands_of_scans_is_refused_unread():
    """10,000 tiny scans: each is a decoding pass over the image (minutes of CPU)."""
    data = bf.jpeg_with_scans(CAT, 10_000)
    with pytest.raises(ImageError, match="10000 scans") as e:
        inspect(data, len(data), MAX)
    assert e.value.kind == "too_large"
    assert kind_of(bf.jpeg_with_scans(CAT, imageinfo.MAX_JPEG_SCANS)) == "ok"


def test_a_huge_frame_with_a_few_kilobytes_of_data_is_corrupt():
    data = bf.jpeg_frame_without_data(9000, 9000, 2048)
    with pytest.raises(ImageError, match="9000x9000 frame needs at least") as e:
        inspect(data, len(data), MAX)
    assert e.value.kind == "corrupt"


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7, 0.9])
def test_a_progressive_jpeg_cut_and_given_an_end_marker_is_corrupt(fraction):
    data = bf.cut_with_end_marker(bf.progressive_jpeg(CAT), fraction)
    with pytest.raises(ImageError, match="JPEG") as e:
        inspect(data, len(data), MAX)
    assert e.value.kind == "corrupt"


def test_a_progressive_jpeg_cut_between_scans_is_incomplete():
    from pipeline.imageinfo.jpeg_structure import _jpeg_structure

    whole = bf.progressive_jpeg(CAT)
    body, end = whole[:-2], whole[-2:]
    last_scan = body.rindex(b"\xff\xda")
    cut = body[:last_scan] + end  # every scan whole, the last one missing
    assert len(_jpeg_structure(cut)[1]) == 9
    with pytest.raises(ImageError, match="progressive JPEG is incomplete"):
        inspect(cut, len(cut), MAX)


def test_restart_markers_show_a_baseline_jpeg_cut_short():
    whole = bf.jpeg_with_restart_markers(skimage_photo("coffee"))
    assert kind_of(whole) == "ok"
    for fraction in (0.3, 0.5, 0.7, 0.9):  # (a cut inside the last interval: no marker lacks)
        with pytest.raises(ImageError, match="restart markers") as e:
            data = bf.cut_with_end_marker(whole, fraction)
            inspect(data, len(data), MAX)
        assert e.value.kind == "corrupt"


def test_a_baseline_jpeg_cut_short_is_caught_when_its_last_bits_are_not_padding():
    """The last scan of a whole file ends with 1-bit padding; a cut one ends anywhere. When the
    last bit is 0, libjpeg's strict decode decides (a whole file gets through)."""
    def last_bit(data):  # of the last entropy-coded byte, before the end marker
        return 1 if data[-4:-2] == b"\xff\x00" else data[-3] & 1

    photo = skimage_photo("coffee")
    seen_cut = seen_whole = 0
    for quality in range(60, 100, 3):
        whole = bf.jpeg(photo, quality=quality)
        assert kind_of(whole) == "ok"
        seen_whole += not last_bit(whole)
        for fraction in (0.3, 0.5, 0.7, 0.9):
            data = bf.cut_with_end_marker(whole, fraction)
            if not last_bit(data):
                seen_cut += 1
                assert kind_of(data) == "corrupt", (quality, fraction)
    assert seen_cut >= 10 and seen_whole >= 1  # both paths were taken


def test_a_cut_check_is_left_to_the_decoded_last_block_only_where_that_block_tells():
    """defer_cut_check (the reader's): a baseline JPEG of one scan whose data ends in a 0 bit
    comes back flagged instead of being decoded strictly here; progressive and CMYK JPEGs,
    whose damage does not show as a gray last block, are still decided by libjpeg here."""
    photo = skimage_photo("coffee")
    flags = set()
    for quality in range(60, 100, 3):
        data = bf.jpeg(photo, quality=quality)
        ends_in_zero = bf.ends_in_a_zero_bit(data)
        assert inspect(data, len(data), MAX, defer_cut_check=True).check_last_block == ends_in_zero
        assert not inspect(data, len(data), MAX).check_last_block
        flags.add(ends_in_zero)
    assert flags == {True, False}  # both kinds were seen
    for data in (bf.cut_with_end_marker(bf.progressive_jpeg(photo), 0.7),
                 bf.cut_with_end_marker(bf.cmyk_jpeg(photo), 0.7)):
        with pytest.raises(ImageError, match="JPEG") as e:
            inspect(data, len(data), MAX, defer_cut_check=True)
        assert e.value.kind == "corrupt"


def test_no_false_alarm_on_real_photos_in_every_jpeg_flavour(shared_images):
    from PIL import Image

    for path in sorted(shared_images.iterdir()):
        data = path.read_bytes()
        photo = np.asarray(Image.open(path).convert("RGB"))
        for variant in (data, bf.progressive_jpeg(photo), bf.cmyk_jpeg(photo),
                        bf.jpeg_with_restart_markers(photo), bf.grayscale_jpeg(photo),
                        bf.encode(bf.pil(photo), "JPEG", quality=90, optimize=True)):
            assert kind_of(variant) == "ok", path.name


def test_a_hole_of_zeros_is_corrupt_also_where_libjpeg_decodes_on_without_a_word():
    """Standard Huffman tables cannot code 256 zero bytes: refused from the structure (libjpeg
    reads those zeros as valid codes and, for this photo, never warns). Optimized tables code
    flat areas as zeros: a white page with long zero runs is fine, its hole goes to libjpeg."""
    motorcycle = bf.jpeg(skimage_photo("motorcycle"))
    holed = bf.zero_hole(motorcycle, 0.5)
    assert imageinfo.strict_jpeg_damage(holed) is None
    with pytest.raises(ImageError, match="zero bytes at byte .* which its Huffman tables cannot "
                                         "code") as e:
        inspect(holed, len(holed), MAX)
    assert e.value.kind == "corrupt"
    page = np.full((1200, 1600, 3), 255, np.uint8)
    page[500:700, 600:1000] = skimage_photo("chelsea")[:200, :400]
    white = bf.encode(bf.pil(page), "JPEG", quality=90, optimize=True)
    assert kind_of(white) == "ok"
    assert kind_of(bf.zero_hole(white, 0.5)) == "corrupt"


# --- EXIF orientation, as Pillow's exif_transpose reads it -------------------------------------

def pillow_upright_size(data: bytes) -> tuple[int, int]:
    from PIL import Image, ImageOps

    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size


@pytest.mark.parametrize("blocks, expected", [
    ([bf.exif_block(6, 3)], 6),  # SHORT, as cameras write it
    ([bf.exif_block(6, 4)], 6),  # LONG, as some tools write it
    ([bf.exif_block(8, 9)], 8),  # SLONG
    ([bf.exif_block(6, 1)], 1),  # BYTE: Pillow does not apply it
    ([bf.exif_block(6, 3), bf.exif_block(3, 3)], 6),  # two segments: the first wins
    ([bf.exif_block(1, 4), bf.exif_block(6, 3)], 1),
    ([b"Exif\x00\x00broken", bf.exif_block(6, 3)], 1),
])
def test_exif_orientation_matches_pillow(blocks, expected):
    data = bf.jpeg_with_exif_segments(CAT, blocks)
    assert probe(data).orientation == expected
    sideways = expected >= 5
    assert pillow_upright_size(data) == ((300, 451) if sideways else (451, 300))


# --- the formats Pillow decodes: sizes and checks from the header ----------------------------

SMALL = np.ascontiguousarray(CAT[::2, ::2])  # 226x150: quick to encode as HEIC and AVIF


def test_heif_avif_tiff_and_lossless_jpeg_sizes_come_from_the_header():
    odd = np.ascontiguousarray(SMALL[:149, :225])  # HEVC codes 226x150: the clean aperture says 225x149
    sideways = np.ascontiguousarray(np.rot90(odd, 1))
    for data, fmt, size in [
        (ff.heic(odd), "heif", (225, 149)),
        (ff.heic(sideways, orientation=6), "heif", (149, 225)),  # as stored, before irot
        (ff.heic_grid(SMALL, 64), "heif", (226, 150)),
        (ff.heic_two_images(SMALL, SMALL[:100, :50].copy()), "heif", (226, 150)),  # the primary
        (ff.avif(odd), "avif", (225, 149)),
        (ff.tiff(CAT, compression="tiff_lzw"), "tiff", (451, 300)),
        (ff.tiff_raw(CAT, rows_per_strip=7), "tiff", (451, 300)),
        (ff.tiff(sideways, orientation=6), "tiff", (149, 225)),
        (ff.lossless_jpeg(CAT[:40, :60]), "jpeg", (60, 40)),
    ]:
        info = inspect(data, len(data), MAX)
        assert (info.format, info.pillow, (info.width, info.height)) == (fmt, True, size)


def test_avif_brand_among_the_compatible_ones_is_avif():
    data = bytearray(ff.avif(CAT[:64, :64].copy()))
    assert data[8:12] == b"avif"
    data[8:12] = b"mif1"  # major brand mif1, avif only among the compatible brands
    assert imageinfo.sniff_format(bytes(data)) == "avif"


@pytest.mark.parametrize("make, kind, words", [
    (lambda: bf.truncated(ff.heic(SMALL), 0.6), "corrupt", "HEIF is truncated"),
    (lambda: bf.truncated(ff.avif(SMALL), 0.9), "corrupt", "AVIF is truncated"),
    (lambda: ff.heic_with_broken_tile(SMALL, tile=64), "corrupt", "tile 6 of 12"),
    (lambda: ff.avif_with_bad_header(SMALL), "corrupt", "no size"),
    (lambda: ff.tiff_strip_bomb(), "too_large", "declares 50000000 strips"),
    (lambda: ff.tiff_header_only(50_000, 50_000), "too_large", "2500.0 megapixels"),
    (lambda: ff.tiff_raw(CAT, rows_per_strip=1)[:500], "corrupt", "strip table"),
])
def test_damaged_heif_avif_tiff_are_refused_before_decoding(make, kind, words):
    with pytest.raises(ImageError, match=words) as info:
        data = make()
        inspect(data, len(data), MAX)
    assert info.value.kind == kind


def test_heif_tiles_far_larger_than_the_image_are_a_bomb():
    from pipeline.imageinfo import heif

    data = ff.heic_grid(SMALL, 64)
    limit = heif.MAX_TILE_COVER
    try:
        heif.MAX_TILE_COVER = 1  # 12 tiles of 64x64 cover 256x192, 1.45x the 226x150 image
        assert kind_of(data) == "too_large"
    finally:
        heif.MAX_TILE_COVER = limit
    assert kind_of(data) == "ok"


def test_heif_header_past_the_first_bytes_asks_for_more():
    data = ff.heic(SMALL)
    (ftyp,) = struct.unpack(">I", data[:4])
    moved = data[:ftyp] + struct.pack(">I", 70_000) + b"free" + bytes(70_000 - 8) + data[ftyp:]
    with pytest.raises(NeedMoreBytes):
        probe(moved[:HEAD_BYTES], len(moved))
    assert probe(moved).width == 226
