"""The header check and the JPEG cut checks, as graph ops over imageinfo (numpy_function).

A failing check raises ImageError inside tf.data: the element is dropped, and the reader's
diagnosis explains it afterwards.
"""
from __future__ import annotations

import numpy as np

from .. import imageinfo
from ..imageinfo import ImageError


def _inspect_py(data: bytes, max_pixels: int) -> np.ndarray:
    data = bytes(data)
    info = imageinfo.inspect(data, len(data), int(max_pixels), defer_cut_check=True)
    code = imageinfo.FORMAT_CODES["pillow" if info.pillow else info.format]
    return np.array([code, info.width, info.height,
                     info.orientation, info.prepare, info.check_last_block], np.int32)


def inspect_in_graph(data, max_pixels: int):
    """imageinfo.inspect on the whole file (a JPEG's structure is checked to its end): format
    code, width, height, orientation, prepare, check_last_block."""
    import tensorflow as tf

    out = tf.numpy_function(_inspect_py, [data, np.int64(max_pixels)], tf.int32, stateful=False)
    out.set_shape([6])
    return tuple(tf.unstack(out))


def _prepare_py(data: bytes, max_pixels: int) -> bytes:
    data = bytes(data)
    return imageinfo.prepare(data, imageinfo.probe(data), int(max_pixels))


def prepare_in_graph(data, max_pixels: int):
    """imageinfo.prepare: the bytes rewritten so TensorFlow decodes them as the format means."""
    import tensorflow as tf

    out = tf.numpy_function(_prepare_py, [data, np.int64(max_pixels)], tf.string, stateful=False)
    out.set_shape([])
    return out


def refuse_cut_jpeg(crop, data, fmt):
    """libjpeg decodes a baseline JPEG cut short (and given an end marker) with the missing
    part exactly gray (128): when the crop's last row is that, a strict decode decides."""
    import tensorflow as tf

    suspect = tf.logical_and(tf.equal(fmt, imageinfo.FORMAT_CODES["jpeg"]),
                             tf.reduce_all(tf.equal(crop[-1], 128)))
    return _strict_jpeg_if(suspect, data, crop)


def refuse_cut_at_last_block(image, data):
    """`image` ends at the image's bottom-right corner: gray there (as every block after a cut
    is, imageinfo.last_block_tells), a strict decode decides."""
    import tensorflow as tf

    return _strict_jpeg_if(tf.reduce_all(tf.equal(image[-1, -1], 128)), data, image)


def _strict_jpeg_if(suspect, data, image):
    """`image`, once a strict decode of `data` found no damage where `suspect` (else as is)."""
    import tensorflow as tf

    checked = tf.cond(suspect, lambda: _strict_jpeg_in_graph(data), lambda: tf.constant(True))
    with tf.control_dependencies([checked]):
        return tf.identity(image)


def _strict_jpeg_py(data: bytes) -> np.bool_:
    reason = imageinfo.strict_jpeg_damage(bytes(data))
    if reason:
        raise ImageError("corrupt", reason)
    return np.bool_(True)


def _strict_jpeg_in_graph(data):
    import tensorflow as tf

    out = tf.numpy_function(_strict_jpeg_py, [data], tf.bool, stateful=False)
    out.set_shape([])
    return out
