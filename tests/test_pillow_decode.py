"""The Pillow decoder: the pixels, orientation and refusals it hands the reader, on real files."""
import sys
import threading

import badfiles as bf
import formatfiles as ff
import numpy as np
import pytest
from conftest import skimage_photo

from pipeline import imageinfo, pillow_decode
from pipeline.imageinfo import ImageError

CAT = np.ascontiguousarray(skimage_photo("chelsea")[::2, ::2])  # 226x150
SIDEWAYS = np.ascontiguousarray(np.rot90(CAT, 1))  # stored so that orientation 6 shows CAT
MAX = 90_000_000


def decoded(data: bytes, max_pixels: int = MAX) -> tuple[np.ndarray, int]:
    return pillow_decode.decode(data, imageinfo.probe(data).format, max_pixels)


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    from PIL import Image, ImageOps

    image = Image.fromarray(pixels)
    image.getexif()[0x0112] = orientation
    return np.asarray(ImageOps.exif_transpose(image))


def mean_error(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(int) - b).mean())


@pytest.mark.parametrize("make", [
    lambda: ff.tiff(CAT, compression="tiff_lzw"),
    lambda: ff.tiff(CAT, compression="tiff_adobe_deflate"),
    lambda: ff.tiff_raw(CAT, rows_per_strip=7),
    lambda: ff.tiff_raw(CAT.astype(np.uint16) * 257),  # 16-bit RGB: the high byte
    lambda: ff.tiff_pages([CAT, CAT[::-1].copy()]),  # the first page
    lambda: ff.lossless_jpeg(CAT[:40, :60]),
    lambda: ff.bmp_rle8(CAT),
])
def test_lossless_files_decode_to_exactly_their_pixels(make):
    data = make()
    pixels, orientation = decoded(data)
    expected = CAT[:40, :60] if imageinfo.probe(data).format == "jpeg" else CAT
    if data[:2] == b"BM":  # RLE8 holds the photo's 256-colour palette version
        from PIL import Image

        expected = np.asarray(Image.fromarray(CAT).convert("P").convert("RGB"))
    assert pixels.dtype == np.uint8 and orientation == 1
    np.testing.assert_array_equal(pixels, expected)


def test_gray_16_bit_and_cmyk_tiff_convert_as_the_tensorflow_paths_do():
    gray, _ = decoded(ff.tiff_raw(CAT[..., 1].astype(np.uint16) * 256 + 255))
    np.testing.assert_array_equal(gray, np.repeat(CAT[..., 1:2], 3, axis=2))  # >> 8, as TF's 16-bit PNG
    from PIL import Image

    cmyk = np.asarray(Image.fromarray(CAT).convert("CMYK"))
    pixels, _ = decoded(ff.tiff(CAT, "CMYK"))
    c, m, y, k = (cmyk[..., i].astype(int) for i in range(4))
    formula = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255
    assert np.abs(pixels - formula).max() <= 1  # TF's CMYK JPEG decode: inverted C * K / 255


def test_lossy_heic_and_avif_decode_close_to_their_pixels():
    for data in (ff.heic(CAT), ff.heic_grid(CAT, 64), ff.avif(CAT)):
        pixels, orientation = decoded(data)
        assert orientation == 1 and mean_error(pixels, CAT) < 3


@pytest.mark.parametrize("make, stored_as", [
    (lambda: ff.tiff(SIDEWAYS, orientation=6), "upright"),  # Pillow turns TIFF on load
    (lambda: ff.avif(SIDEWAYS, orientation=6), "sideways"),  # irot/imir, read as the EXIF tag
    (lambda: ff.heic(SIDEWAYS, orientation=6), "upright"),  # libheif applies irot/imir
])
def test_orientation_is_applied_once(make, stored_as):
    """Whatever the decoder did itself, its pixels turned by the orientation it reports show
    the upright photo."""
    pixels, orientation = decoded(make())
    assert (orientation == 1) == (stored_as == "upright")
    assert mean_error(upright(pixels, orientation), CAT) < 3


def test_multi_image_heic_gives_its_primary_image():
    other = np.ascontiguousarray(skimage_photo("coffee")[:150, :226])
    pixels, _ = decoded(ff.heic_two_images(CAT, other))
    assert mean_error(pixels, CAT) < 3


def test_an_embedded_icc_profile_is_converted_to_srgb():
    from PIL import Image, ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    same, _ = decoded(ff.tiff(CAT, icc_profile=srgb))
    assert mean_error(same, CAT) < 1
    lab = Image.fromarray(CAT).convert("CMYK")  # a CMYK TIFF with an sRGB profile: not CMYK's
    broken, _ = decoded(bf.encode(lab, "TIFF", icc_profile=b"not a profile"))
    np.testing.assert_array_equal(broken, np.asarray(lab.convert("RGB")))  # ignored, as viewers do


def test_the_decoded_size_is_checked_against_max_pixels():
    with pytest.raises(ImageError, match="above --max-pixels") as info:
        decoded(ff.heic(CAT), max_pixels=226 * 150 - 1)
    assert info.value.kind == "too_large"


@pytest.mark.parametrize("make, kind, words", [
    (lambda: bf.truncated(ff.tiff(CAT, compression="tiff_lzw"), 0.7), "corrupt", "TIFF"),
    (lambda: bf.truncated(ff.lossless_jpeg(CAT[:40, :60]), 0.5), "corrupt", "JPEG"),
    (lambda: bf.truncated(ff.bmp_rle8(CAT), 0.5), "corrupt", "BMP"),
    (lambda: ff.tiff_raw(CAT.astype(np.float32)[..., :1].copy().view(np.uint32)[..., 0]),
     "unsupported_format", "32-bit"),
])
def test_damage_the_header_checks_cannot_see_is_an_error_of_its_kind(make, kind, words):
    with pytest.raises(ImageError, match=words) as info:
        decoded(make())
    assert info.value.kind == kind


def test_without_pillow_heif_a_heic_is_unsupported_naming_the_package(monkeypatch):
    data = ff.heic(CAT)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # `import pillow_heif` fails
    with pytest.raises(ImageError, match="pip install pillow-heif") as info:
        decoded(data)
    assert info.value.kind == "unsupported_format"
    assert decoded(ff.avif(CAT))[0].shape == (150, 226, 3)  # AVIF is Pillow's own


def _heif_decoder(data: bytes):
    import pillow_heif

    return pillow_heif.open_heif(data)[0].load  # decodes when called


def _avif_decoder(data: bytes):
    import io

    from PIL import AvifImagePlugin

    return AvifImagePlugin.AvifImageFile(io.BytesIO(data)).load


@pytest.mark.parametrize("make, decoder", [(lambda: ff.heic(CAT), _heif_decoder),
                                           (lambda: ff.avif(CAT), _avif_decoder)])
def test_the_native_decode_releases_the_gil(make, decoder):
    """The signal watchdog (interrupts.exit_when_stuck) is a Python thread: it can end a run
    stuck in a slow HEIC/AVIF decode only if the decoder releases the GIL. With the switch
    interval out of reach, another thread can take the GIL only where the decoding thread
    gives it up, so it counts only while the decoder runs without the GIL."""
    data, counted, stop = make(), [0], threading.Event()

    def count():
        while not stop.is_set():
            counted[0] += 1
            stop.wait(0.0005)  # gives the GIL back at once

    interval = sys.getswitchinterval()
    counter = threading.Thread(target=count)
    counter.start()
    during = []
    try:
        sys.setswitchinterval(60)
        for _ in range(10):
            decode = decoder(data)
            before = counted[0]
            decode()
            during.append(counted[0] - before)
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        counter.join()
    assert sum(during) > 0, during


def test_report_thumbnails_of_pillow_formats_are_upright(tmp_path):
    import io

    from PIL import Image

    from pipeline import thumbnails
    from pipeline.types import ReadLimits, S3Options

    path = tmp_path / "sideways.avif"
    path.write_bytes(ff.avif(SIDEWAYS, orientation=6))
    made = thumbnails.make(str(path), 64, ReadLimits(), S3Options())
    assert made.jpeg, made.reason
    assert Image.open(io.BytesIO(made.jpeg)).size == (64, 42)  # CAT's 226x150, upright
