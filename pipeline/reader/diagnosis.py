"""Why an input could not be labeled, found in Python after tf.data dropped it (failures are
rare, so reading it again is cheap)."""
from __future__ import annotations

import dataclasses
import re

from .. import imageinfo, inputs, pillow_decode, storage
from ..imageinfo import ImageError
from ..types import ErrorRecord, ImageRef, ReadLimits, S3Options, printable
from .reading import sha256_hex


def diagnose(ref: ImageRef, max_pixels: int, max_file_bytes: int = ReadLimits.max_file_bytes,
             s3: S3Options = S3Options()) -> ErrorRecord:
    """Explain why an input could not be labeled (runs only for failures). Reads at most
    max_file_bytes and never opens what is not a regular file. The record carries the sha256
    of the bytes read, when any were."""
    out = printable_ref(ref)
    if ref.entry_error:  # a manifest entry that names no file: nothing to read
        return ErrorRecord(out, "invalid_entry", ref.entry_error)
    try:
        data = inputs.open_input(ref.uri, s3).read_explained(max_file_bytes, ref.file_size)
    except ImageError as e:  # the size when the header gave it (unsupported JPEG/BMP kinds)
        return ErrorRecord(out, e.kind, printable(str(e)), e.width, e.height)
    return dataclasses.replace(_diagnose_bytes(out, data, max_pixels),
                               content_sha256=sha256_hex(data))


def diagnose_safely(ref: ImageRef, max_pixels: int, max_file_bytes: int,
                    s3: S3Options) -> ErrorRecord:
    """diagnose, and should it fail itself (a bug, memory), still one row rather than a dead run."""
    try:
        return diagnose(ref, max_pixels, max_file_bytes, s3)
    except storage.S3Unavailable:  # not this image's fault: the run stops and resumes later
        raise
    except Exception as e:  # noqa: BLE001 -- any failure here must become data
        return ErrorRecord(printable_ref(ref), "unreadable", printable(
            f"could not be labeled, and explaining why failed too ({type(e).__name__}: {e}); "
            f"the next run retries it"))


def printable_ref(ref: ImageRef) -> ImageRef:
    """`ref` with a UTF-8-safe uri (backslash escapes for a name that is not valid UTF-8)."""
    uri = printable(ref.uri)
    return ref if uri == ref.uri else dataclasses.replace(ref, uri=uri)


def _diagnose_bytes(out: ImageRef, data: bytes, max_pixels: int) -> ErrorRecord:
    try:
        info = imageinfo.probe(data)
    except ImageError as e:
        return ErrorRecord(out, e.kind, printable(str(e)), e.width, e.height)
    try:
        imageinfo.inspect(data, len(data), max_pixels)
        if info.prepare:
            data = imageinfo.prepare(data, info, max_pixels)
    except ImageError as e:
        return ErrorRecord(out, e.kind, str(e), info.width, info.height)
    if info.pillow:
        return _diagnose_pillow(out, data, info, max_pixels)
    reason = imageinfo.damage(data, info)
    if reason is None and info.format == "jpeg":
        reason = imageinfo.strict_jpeg_damage(data)
    if reason is None:
        error = _decode_error(data)
        if error is None:  # it decodes now: the run's read failed (I/O?), so retry next run
            return ErrorRecord(out, "unreadable", "reading the file failed during the run, but "
                               "it decodes now (a transient I/O error?); the next run retries it",
                               info.width, info.height)
        reason = f"{info.format.upper()} cannot be decoded: {error}"
    return ErrorRecord(out, "corrupt", reason, info.width, info.height)


def _diagnose_pillow(out: ImageRef, data: bytes, info: imageinfo.ImageInfo,
                     max_pixels: int) -> ErrorRecord:
    e = pillow_decode.error(data, info.format, max_pixels)
    if e is None:  # it decodes now: the run's read failed (I/O?), so retry next run
        return ErrorRecord(out, "unreadable", "reading the file failed during the run, but it "
                           "decodes now (a transient I/O error?); the next run retries it",
                           info.width, info.height)
    return ErrorRecord(out, e.kind, printable(str(e)), info.width, info.height)


def _decode_error(data: bytes) -> str | None:
    """TensorFlow's own complaint, without its op-location decorations."""
    import tensorflow as tf

    try:
        tf.io.decode_image(data, channels=0, expand_animations=False)
    except (tf.errors.OpError, ValueError) as e:
        text = getattr(e, "message", str(e)).strip().splitlines()[0]
        text = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:\w+\]", "", text).strip()
        return text or type(e).__name__
    return None
