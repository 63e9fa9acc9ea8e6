"""Where the model's window lies and how it becomes size x size: the centered crop, libjpeg's
DCT scale for a large window, the window's sub-pixel box in a scaled crop, EXIF orientation,
and the resize."""
from __future__ import annotations

import functools
import math

from ..types import Preprocess

# For each EXIF orientation, whether the stored image's y / x axis runs backwards when upright
_REVERSED_Y = (0, 0, 0, 1, 1, 0, 1, 1, 0)
_REVERSED_X = (0, 0, 1, 1, 0, 0, 0, 1, 1)


def crop_window(height, width, crop_fraction: float | None, orientation=1):
    """Centered square of crop_fraction x the shorter side (TF's EfficientNet eval recipe).

    When the side leaves an odd margin the window sits half a pixel right/below center; for a
    stored-sideways image that rule is applied in the upright frame, so every orientation of
    a photo gets exactly the same crop.
    """
    import tensorflow as tf

    if crop_fraction is None:
        return tf.stack([0, 0, height, width])
    side = tf.maximum(1, tf.cast(crop_fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32))
    index = tf.clip_by_value(orientation, 0, 8)
    back_y = tf.gather(tf.constant(_REVERSED_Y), index)
    back_x = tf.gather(tf.constant(_REVERSED_X), index)
    return tf.stack([(height - side + 1 - back_y) // 2, (width - side + 1 - back_x) // 2, side, side])


# libjpeg's DCT-domain scales: a JPEG decodes at 1/r of each side for r in these
RATIOS = (1, 2, 4, 8)
# The resize methods whose kernel tf.raw_ops.ScaleAndTranslate has too (the same weights), so
# a scaled crop can be resampled at the window's sub-pixel position. Others never scale.
SCALED_KERNELS = {"bicubic": "keyscubic", "bilinear": "triangle", "lanczos3": "lanczos3",
                  "lanczos5": "lanczos5", "gaussian": "gaussian", "mitchellcubic": "mitchellcubic"}


# How many times the model input a scaled crop keeps at least. Measured on the shared sample
# upscaled to 12 MP: keeping 1x (1/8 scale) agreed with full decode on 95 of 100 top-1s and
# lost 2 points of top-1; 1.5x (1/4 scale) agreed on 99 and lost 1 (README, accuracy).
SCALED_DECODE_MARGIN = 1.5


def scaled_target(size: int) -> int:
    return math.ceil(size * SCALED_DECODE_MARGIN)


def dct_ratio(h, w, target: int | None):
    """The largest DCT scale 1/r (r in 1, 2, 4, 8) that leaves an h x w window at least
    `target` pixels on both sides (1 without a target)."""
    import tensorflow as tf

    return tf.bitwise.left_shift(1, dct_ratio_index(h, w, target))


def dct_ratio_index(h, w, target: int | None):
    """dct_ratio's index in RATIOS."""
    import tensorflow as tf

    if not target:
        return tf.constant(0)
    short = tf.minimum(h, w)
    return tf.add_n([tf.cast(short >= r * target, tf.int32) for r in RATIOS[1:]])


def enclosing_window(top, left, h, w, r: int):
    """The window scaled by 1/r, widened to whole pixels of the scaled image (never past its
    edge: libjpeg's scaled side is ceil(side / r), and the window ends inside the image)."""
    import tensorflow as tf

    y0, x0 = top // r, left // r
    y1, x1 = -((-(top + h)) // r), -((-(left + w)) // r)  # ceil
    return tf.stack([y0, x0, y1 - y0, x1 - x0])


def window_box(top, left, h, w, ratio):
    """Where the window lies in its enclosing scaled crop: float [top, left, h, w]."""
    import tensorflow as tf

    r = tf.cast(ratio, tf.float32)
    f = functools.partial(tf.cast, dtype=tf.float32)
    return tf.stack([f(top) / r - f(top // ratio), f(left) / r - f(left // ratio),
                     f(h) / r, f(w) / r])


def unscaled(crop):
    """(crop, ratio 1, the box of the whole crop)."""
    import tensorflow as tf

    shape = tf.cast(tf.shape(crop), tf.float32)
    return crop, tf.constant(1), tf.stack([0.0, 0.0, shape[0], shape[1]])


def crop(image, window, orientation=1):
    """The part of a decoded image that `window` chooses (stored frame; orientation 1 but for
    the formats whose decoder reports it)."""
    import tensorflow as tf

    shape = tf.shape(image)
    top, left, h, w = tf.unstack(window(shape[0], shape[1], orientation))
    return image[top:top + h, left:left + w]


# For each EXIF orientation 0..8: transpose first?, then reverse rows?, then reverse columns?
_TRANSPOSE = (0, 0, 0, 0, 0, 1, 1, 1, 1)
_REVERSE_ROWS = (0, 0, 0, 1, 1, 0, 0, 1, 1)
_REVERSE_COLUMNS = (0, 0, 1, 1, 0, 0, 1, 1, 0)


def apply_orientation(image, orientation):
    """Turn a stored image upright according to its EXIF orientation tag (1..8).

    Without branches (a 9-way switch_case of rot90s traced 41 functions, half of a run's graph
    build): a transpose with a chosen permutation, then strided slices of step 1 or -1.
    """
    import tensorflow as tf

    index = tf.clip_by_value(orientation, 0, 8)
    transpose = tf.gather(tf.constant(_TRANSPOSE), index) > 0
    image = tf.transpose(image, tf.where(transpose, [1, 0, 2], [0, 1, 2]))
    step_rows = 1 - 2 * tf.gather(tf.constant(_REVERSE_ROWS), index)
    step_columns = 1 - 2 * tf.gather(tf.constant(_REVERSE_COLUMNS), index)
    return image[::step_rows, ::step_columns]


def resize(image, pre: Preprocess, ratio=None, box=None):
    """uint8 crop -> float32 size x size. A crop decoded at reduced scale (ratio > 1) is
    resampled from the window's exact place in it (`box`), so the model sees the same window as
    at full scale, not one rounded to the scaled pixels (up to r/2 pixels off at each edge)."""
    import tensorflow as tf

    def whole():  # float32 out (a no-op cast) for every method; "nearest" would keep uint8
        return tf.cast(tf.image.resize(image, (pre.size, pre.size), method=pre.resize), tf.float32)

    def window():
        scale = tf.constant(float(pre.size)) / box[2:]
        out = tf.raw_ops.ScaleAndTranslate(
            images=image[None], size=[pre.size, pre.size], scale=scale,
            translation=-box[:2] * scale, kernel_type=SCALED_KERNELS[pre.resize], antialias=False)
        return out[0]

    if ratio is None or pre.resize not in SCALED_KERNELS:
        return whole()
    return tf.cond(ratio > 1, window, whole)
