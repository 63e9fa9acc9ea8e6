"""The checks before and after a decode: imageinfo's header and structure check (Python, on
the whole file) and, as graph ops, the JPEG cut check that asks libjpeg's strict decode.

A failing check raises ImageError inside tf.data: the element is dropped, and the reader's
diagnosis explains it afterwards.
"""
from __future__ import annotations

import numpy as np

from .. import imageinfo
from ..imageinfo import ImageError, ImageInfo
from .reading import as_bytes


def checked(data: bytes, max_pixels: int) -> tuple[bytes, ImageInfo]:
    """imageinfo.inspect on the whole file (a JPEG's structure is checked to its end), and the
    bytes TF should decode (imageinfo.prepare where the format needs it)."""
    info = imageinfo.inspect(data, len(data), max_pixels, defer_cut_check=True)
    if info.prepare:
        data = imageinfo.prepare(data, info, max_pixels)
    return data, info


def refuse_cut_jpeg(crop, decoded, last_block, data):
    """libjpeg decodes a baseline JPEG cut short (and given an end marker) with the missing
    part exactly gray (128): when the crop's last row is that, or, where the decode went on to
    the image's bottom-right corner (`last_block`, imageinfo.last_block_tells), that corner is,
    a strict decode decides. `crop`, once no damage was found."""
    import tensorflow as tf

    suspect = tf.logical_or(
        tf.reduce_all(tf.equal(crop[-1], 128)),
        tf.logical_and(last_block > 0, tf.reduce_all(tf.equal(decoded[-1, -1], 128))))
    checked = tf.cond(suspect, lambda: _strict_jpeg_in_graph(data), lambda: tf.constant(True))
    with tf.control_dependencies([checked]):
        return tf.identity(crop)


def _strict_jpeg_py(data: bytes) -> np.bool_:
    reason = imageinfo.strict_jpeg_damage(as_bytes(data))
    if reason:
        raise ImageError("corrupt", reason)
    return np.bool_(True)


def _strict_jpeg_in_graph(data):
    import tensorflow as tf

    out = tf.numpy_function(_strict_jpeg_py, [data], tf.bool, stateful=False)
    out.set_shape([])
    return out
