"""The values every format's header reader shares: what it found, and why an image is refused."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class ImageError(Exception):
    """Why an image cannot be labeled: `kind` is machine-readable, str(self) is for people;
    width/height when the header gave them (an error row carries them)."""

    def __init__(self, kind: str, message: str, width: int | None = None,
                 height: int | None = None):
        super().__init__(message)
        self.kind, self.width, self.height = kind, width, height


class NeedMoreBytes(Exception):
    """The header goes on past the bytes given; call again with the whole file."""


class Truncated(ValueError):
    """A header reader's finding: the file ends before data its header points to."""


class Bomb(ValueError):
    """A header reader's finding: the file is built to make a decoder allocate or work far
    beyond its pixels (a TIFF declaring millions of strips, a grid of huge HEIF tiles)."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    orientation: int = 1  # EXIF orientation tag, 1..8
    prepare: bool = False  # TensorFlow must decode `prepare(data, ...)`, not the file itself
    # A JPEG that may be cut short, left to the decoder's last block (see `inspect`)
    check_last_block: bool = False
    # Decoded by Pillow (pipeline.pillow_decode), not TensorFlow: HEIF, AVIF, TIFF, lossless
    # JPEG, palette/RLE/16-bit BMP. Its decoder reports the orientation (`orientation` is 1).
    pillow: bool = False


class Header(NamedTuple):
    """What a format's header reader found (the fields of ImageInfo it fills)."""
    width: int
    height: int
    orientation: int = 1
    prepare: bool = False
    pillow: bool = False


def check_pixels(width: int, height: int, max_pixels: int, what: str = "") -> None:
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"{what}{width}x{height} = {width * height / 1e6:.1f} megapixels is above "
            f"--max-pixels {max_pixels / 1e6:.1f} megapixels",
        )
