"""Which format a file is, from its signature; and what a file with no image signature is."""
from __future__ import annotations

from . import heif
from .base import ImageError


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
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic, BigTIFF
        return "tiff"
    if head[4:8] == b"ftyp" and len(head) >= 16:
        return heif.brand(head) or "video"
    return None


def not_an_image(head: bytes) -> ImageError:
    text = head[:512].lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return ImageError("unsupported_format", "not an image: the file is an HTML/XML document")
    if text and all(32 <= c < 127 or c in (9, 10, 13) for c in text[:256]):
        return ImageError("unsupported_format", "not an image: the file is plain text")
    return ImageError("unsupported_format", "not an image: unknown file signature")

