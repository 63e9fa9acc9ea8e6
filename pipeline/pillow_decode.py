"""The second decoder: Pillow (+ pillow-heif for HEIC/HEIF) for what TensorFlow cannot decode.

HEIF/HEIC (the primary image), AVIF, TIFF (the first page), 8-bit lossless JPEG and the BMP
kinds TensorFlow reads wrong (palette, 1/4/16-bit, RLE, bitfields, OS/2), routed here by the
sniffed format (imageinfo's `ImageInfo.pillow`). It hands the reader's graph what TensorFlow's
decoders hand it, uint8 RGB pixels as stored, so the same crop, resize kernel and orientation
step follow:

- orientation: the EXIF orientation, as Pillow's `ImageOps.exif_transpose` reads it (AVIF's
  irot/imir come to it as that tag); HEIF's irot/imir are applied by libheif while decoding.
- colour: an embedded ICC profile is converted to sRGB; CMYK without one by Pillow's formula
  (the one TensorFlow's CMYK JPEG decode uses); alpha is dropped, keeping the colour under it,
  as on the PNG path; 16-bit samples keep their high byte, as TensorFlow's 16-bit PNG decode.
- limits: the header's pixel count is checked before decoding (imageinfo), and again here on
  the size the decoder reports; libheif's own security limits stay on.
"""
from __future__ import annotations

import io

import numpy as np

from .imageinfo import ImageError

# imageinfo's format -> Pillow's plugin module and class (HEIF goes through pillow-heif's API)
_PILLOW_PLUGINS = {"avif": ("AvifImagePlugin", "AvifImageFile"),
                   "tiff": ("TiffImagePlugin", "TiffImageFile"),
                   "jpeg": ("JpegImagePlugin", "JpegImageFile"),
                   "bmp": ("BmpImagePlugin", "BmpImageFile")}
_NAMES = {"heif": "HEIF", "avif": "AVIF", "tiff": "TIFF", "jpeg": "JPEG", "bmp": "BMP"}
_ORIENTATION_TAG = 0x0112
HEIF_PACKAGE = "pillow-heif"


def decode(data: bytes, fmt: str, max_pixels: int) -> tuple[np.ndarray, int]:
    """(uint8 [h, w, 3] pixels as stored, EXIF orientation 1..8 still to apply); ImageError
    (corrupt, too_large, unsupported_format) when the file cannot be decoded."""
    name = _NAMES.get(fmt, fmt.upper())
    try:
        if fmt == "heif":
            image = _decoded_heif(data, max_pixels)
        else:
            image = _open_pillow(data, fmt)  # the first page of a TIFF, frame of an AVIF
            _check_pixels(image.size, max_pixels, name)
            image.load()
        # After the load: Pillow turns a TIFF upright as it loads it (and drops the tag), and
        # libheif a HEIF (pillow-heif resets the tag); AVIF and JPEG keep it
        return _rgb(image, name), _orientation(image)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError("too_large", f"{name} needs more memory to decode than there is") from None
    except Exception as e:  # noqa: BLE001 -- Pillow and libheif report damage in many types
        raise _damage(e, name) from None


def error(data: bytes, fmt: str, max_pixels: int) -> ImageError | None:
    """Why `decode` fails on this file, or None if it decodes (the reader's diagnosis)."""
    try:
        decode(data, fmt, max_pixels)
    except ImageError as e:
        return e
    return None


def _open_pillow(data: bytes, fmt: str):
    """The plugin's class itself, not Image.open: the format is known, and Image.open would
    replace the plugin's reason for refusing a file with "cannot identify image file"."""
    import importlib

    module, name = _PILLOW_PLUGINS[fmt]
    return getattr(importlib.import_module(f"PIL.{module}"), name)(io.BytesIO(data))


def _decoded_heif(data: bytes, max_pixels: int):
    try:
        import pillow_heif
    except ImportError:
        raise ImageError("unsupported_format", f"HEIC/HEIF images need the Python package "
                         f"{HEIF_PACKAGE}, which is not installed (it has no wheel for every "
                         f"platform): pip install {HEIF_PACKAGE}") from None
    heif = pillow_heif.open_heif(data, convert_hdr_to_8bit=True)
    primary = heif[heif.primary_index]
    _check_pixels(primary.size, max_pixels, "HEIF")
    return primary.to_pillow()  # decodes; libheif applies irot/imir


def _orientation(image) -> int:
    value = image.getexif().get(_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError("too_large", f"{name} is {width}x{height} = {width * height / 1e6:.1f} "
                         f"megapixels, above --max-pixels {max_pixels / 1e6:.1f} megapixels")


def _rgb(image, name: str) -> np.ndarray:
    """uint8 [h, w, 3]: decoded, 16-bit to 8, ICC to sRGB, CMYK to RGB, alpha dropped."""

    image.load()
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        gray = (np.asarray(image, np.uint16) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("I", "F"):
        what = "integer" if image.mode == "I" else "float"
        raise ImageError("unsupported_format", f"{name} with 32-bit {what} "
                         f"samples (scientific data, not a photo) is not supported; convert it "
                         f"to PNG")
    if image.mode in ("RGBa", "La"):
        image = image.convert(image.mode[0:-1] + "A")  # un-premultiply first
    profile = image.info.get("icc_profile")
    if profile and image.mode in ("RGB", "RGBA", "RGBX", "CMYK", "L", "LA"):
        converted = _to_srgb(image, profile)
        if converted is not None:
            return np.asarray(converted)
    try:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
    except ValueError:
        raise ImageError("unsupported_format", f"{name} in {image.mode} colour is not "
                         f"supported; convert it to PNG") from None
    return np.asarray(rgb)


def _to_srgb(image, profile: bytes):
    """The image in sRGB through its embedded ICC profile; None if the profile is unusable
    (ignored then, as image viewers do)."""
    from PIL import ImageCms

    base = {"RGBA": "RGB", "RGBX": "RGB", "LA": "L"}.get(image.mode, image.mode)
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if image.mode != base:
            image = image.convert(base)
        return ImageCms.profileToProfile(image, source, _srgb(), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None


_SRGB: list = []


def _srgb():
    from PIL import ImageCms

    if not _SRGB:
        _SRGB.append(ImageCms.createProfile("sRGB"))
    return _SRGB[0]


def _damage(e: Exception, name: str) -> ImageError:
    from PIL import Image

    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, Image.DecompressionBombError):
        return ImageError("too_large", f"{name} is a decompression bomb (Pillow: {message})")
    lowered = message.lower()
    if "security limit" in lowered:
        return ImageError("too_large", f"{name} is beyond libheif's security limits ({message})")
    if "no decoding plugin" in lowered or "unsupported feature" in lowered:
        return ImageError("unsupported_format", f"{name} cannot be decoded here ({message}); "
                          f"convert it to JPEG or PNG")
    if "truncated" in lowered or isinstance(e, EOFError):
        return ImageError("corrupt", f"{name} is truncated: {message} (incomplete download "
                          f"or copy?)")
    return ImageError("corrupt", f"{name} cannot be decoded: {message}")
