"""Image ids and names: the id of a path, which names are images."""
from __future__ import annotations

import os


IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff",
     ".heic", ".heif", ".avif"}
)


def path_id(name: str) -> str:
    """The image_id of a path (relative to INPUT, or as a manifest writes it): valid UTF-8 and
    one id per name. A backslash is written `\\\\`, a NUL `\\x00`, and each byte that is not
    UTF-8 `\\xNN`, so `caf\\xe9.jpg` (those 11 characters) and caf<byte E9>.jpg stay apart."""
    if "\\" not in name and "\0" not in name and (name.isascii() or _is_utf8(name)):
        return name
    out = []
    for ch in name:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\0":
            out.append("\\x00")
        elif "\udc80" <= ch <= "\udcff":  # surrogateescape: the undecodable byte 0x80..0xff
            out.append(f"\\x{ord(ch) - 0xdc00:02x}")
        elif "\ud800" <= ch <= "\udfff":  # a lone surrogate not from a file name
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_image_name(name: str) -> bool:
    """By extension, any case. `._photo.jpg` is the AppleDouble metadata macOS leaves beside
    photo.jpg on non-Mac disks and in zips: never an image, even when named as INPUT."""
    base = os.path.basename(name)
    return not base.startswith("._") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
    """A dotfile or dot-directory (`.thumbnails/`, `.DS_Store`, macOS `._photo.jpg`)."""
    return name.startswith(".")
