"""Pixels -> model input: the one normalization both feeds use, from the model's Preprocess.

The reader either normalizes itself (feed "float32": it hands over model-ready float32) or
hands over the resized crop rounded to uint8 (feed "uint8": a quarter of the bytes), and the
predictor normalizes as the model's first step: in TensorFlow on the model's device (Keras),
in numpy before the invoke (LiteRT). Both call `normalize` / `normalize_numpy` below.
"""
from __future__ import annotations

import numpy as np

from .types import Preprocess

FEEDS = ("uint8", "float32")


def normalize(images, pre: Preprocess):
    """TensorFlow: RGB pixels (uint8 or float32, [..., size, size, 3]) -> float32 model input."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    if pre.bgr:
        images = images[..., ::-1]
    return (images - _per_pixel(pre.mean, pre)) / _per_pixel(pre.std, pre)


def _per_pixel(values: tuple[float, float, float], pre: Preprocess):
    """A per-channel constant shaped so the arithmetic never broadcasts along the 3 channels
    (Eigen does that element by element: 4x the cost of the same op on whole arrays): a scalar
    when the channels agree, else one value per pixel and channel. The same float32 values."""
    import tensorflow as tf

    if len(set(values)) == 1:
        return tf.constant(values[0], tf.float32)
    return tf.constant(np.broadcast_to(np.array(values, np.float32), (pre.size, pre.size, 3)))


def normalize_numpy(images: np.ndarray, pre: Preprocess) -> np.ndarray:
    """numpy: the same arithmetic as `normalize`, in float32."""
    images = np.asarray(images, np.float32)
    if pre.bgr:
        images = images[..., ::-1]
    return (images - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)


def to_uint8(resized):
    """TensorFlow: the resized float image rounded to the nearest level and saturated to
    0..255 (bicubic overshoots the range a little at sharp edges)."""
    import tensorflow as tf

    return tf.saturate_cast(tf.round(resized), tf.uint8)


def is_pixels(images) -> bool:
    """Whether a batch holds uint8 pixels (else it is model-ready float input)."""
    return np.dtype(getattr(images.dtype, "as_numpy_dtype", images.dtype)) == np.uint8


def bytes_per_image(pre: Preprocess, feed: str) -> int:
    """What one image costs on its way to the model: size x size x 3 x the feed's item size."""
    return pre.size * pre.size * 3 * np.dtype(feed).itemsize
