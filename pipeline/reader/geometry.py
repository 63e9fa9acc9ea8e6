"""Where the model's window lies and how it becomes size x size.

Planned in Python from the header, once per image (a few integer operations; as graph ops
they cost more than the resize): the crop window, libjpeg's DCT scale for a large window, the
pixels to decode and where the window lies in them. In the graph: the resize from that place,
and EXIF orientation.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from ..types import Preprocess

# window(height, width, orientation, params) -> (top, left, h, w) in the stored image's pixels;
# `params` is a float32 vector the graph passes through (fine-tuning's random numbers).
Window = Callable[[int, int, int, np.ndarray], tuple[int, int, int, int]]

# For each EXIF orientation, whether the stored image's y / x axis runs backwards when upright
_REVERSED_Y = (0, 0, 0, 1, 1, 0, 1, 1, 0)
_REVERSED_X = (0, 0, 1, 1, 0, 0, 0, 1, 1)


def crop_window(height: int, width: int, crop_fraction: float | None,
                orientation: int = 1) -> tuple[int, int, int, int]:
    """Centered square of crop_fraction x the shorter side (TF's EfficientNet eval recipe), the
    side computed in float32 as that recipe does.

    When the side leaves an odd margin the window sits half a pixel right/below center; for a
    stored-sideways image that rule is applied in the upright frame, so every orientation of
    a photo gets exactly the same crop.
    """
    if crop_fraction is None:
        return 0, 0, height, width
    side = max(1, int(np.float32(crop_fraction) * np.float32(min(height, width))))
    index = min(max(orientation, 0), 8)
    return ((height - side + 1 - _REVERSED_Y[index]) // 2,
            (width - side + 1 - _REVERSED_X[index]) // 2, side, side)


def center_window(crop_fraction: float | None) -> Window:
    """The labeling window: crop_window, whatever the params."""
    def window(height: int, width: int, orientation: int, params: np.ndarray):
        return crop_window(height, width, crop_fraction, orientation)
    return window


# libjpeg's DCT-domain scales: a JPEG decodes at 1/r of each side for r in these
RATIOS = (1, 2, 4, 8)
# The resize methods whose kernel tf.raw_ops.ScaleAndTranslate has too (the same weights), so
# a scaled crop can be resampled at the window's sub-pixel position. Others never scale.
SCALED_KERNELS = {"bicubic": "keyscubic", "bilinear": "triangle", "lanczos3": "lanczos3",
                  "lanczos5": "lanczos5", "gaussian": "gaussian", "mitchellcubic": "mitchellcubic"}


# How many times the model input a scaled crop keeps at least. Measured on the shared sample
# upscaled to 12 MP: keeping 1x (1/8 scale) agreed with full decode on 95 of 100 top-1s and
# lost 2 points of top-1; 1.5x (1/4 scale) agreed on 99 and lost 1 (docs/performance.md).
SCALED_DECODE_MARGIN = 1.5


def scaled_target(pre: Preprocess, scaled_decode: bool) -> int | None:
    """The side a scaled crop keeps at least, or None where the crop never scales."""
    if not scaled_decode or pre.resize not in SCALED_KERNELS:
        return None
    return math.ceil(pre.size * SCALED_DECODE_MARGIN)


def dct_ratio(h: int, w: int, target: int | None) -> int:
    """The largest DCT scale 1/r (r in 1, 2, 4, 8) that leaves an h x w window at least
    `target` pixels on both sides (1 without a target)."""
    short = min(h, w)
    return max(r for r in RATIOS if r == 1 or (target and short >= r * target))


def enclosing_window(top: int, left: int, h: int, w: int, r: int) -> tuple[int, int, int, int]:
    """The window scaled by 1/r, widened to whole pixels of the scaled image (never past its
    edge: libjpeg's scaled side is ceil(side / r), and the window ends inside the image)."""
    y0, x0 = top // r, left // r
    y1, x1 = -((-(top + h)) // r), -((-(left + w)) // r)  # ceil
    return y0, x0, y1 - y0, x1 - x0


def window_box(top: int, left: int, h: int, w: int, r: int) -> np.ndarray:
    """Where the window lies in its enclosing scaled crop: float32 [top, left, h, w]."""
    f, rf = np.float32, np.float32(r)
    return np.array([f(top) / rf - f(top // r), f(left) / rf - f(left // r), f(h) / rf,
                     f(w) / rf], np.float32)


class Plan(NamedTuple):
    """One image's decode, as int32 fields (a vector in the graph; `Plan(*tf.unstack(v))`)."""

    format: int  # imageinfo.FORMAT_CODES
    width: int  # original, before EXIF rotation
    height: int
    orientation: int
    ratio_index: int  # index in RATIOS (JPEG only; 0 = full scale)
    top: int  # JPEG: the pixels to decode, in the scaled image
    left: int
    decode_height: int
    decode_width: int
    crop_height: int  # JPEG: the first rows/columns of those that enclose the window
    crop_width: int
    last_block: int  # decoded on to the bottom-right corner, which the cut check reads


def plan(fmt: int, width: int, height: int, orientation: int, last_block: bool,
         window: Window, target: int | None, params: np.ndarray,
         jpeg: bool) -> tuple[np.ndarray, np.ndarray]:
    """(Plan as int32 [12], float32 box [4] where the window lies in the decoded crop).

    A JPEG crops inside the decoder (its header size is exact): a window at least 2x `target`
    decodes at 1/2, 1/4 or 1/8 scale, the crop is the scaled window's enclosing pixels and the
    box the window's exact place in them, for `resize`. With `last_block` (imageinfo's
    check_last_block) it decodes on to the image's bottom-right corner. Other formats crop by
    the decoded shape (`window_of`), so only the first four fields count for them.
    """
    if not jpeg:
        fields = Plan(fmt, width, height, orientation, 0, 0, 0, 0, 0, 0, 0, 0)
        return np.array(fields, np.int32), np.zeros(4, np.float32)
    top, left, h, w = window(height, width, orientation, params)
    r = dct_ratio(h, w, target)
    crop = enclosing_window(top, left, h, w, r)
    decoded = enclosing_window(top, left, height - top, width - left, r) if last_block else crop
    fields = Plan(fmt, width, height, orientation, RATIOS.index(r), *decoded, crop[2], crop[3],
                  int(last_block))
    return np.array(fields, np.int32), window_box(top, left, h, w, r)


def window_of(shape: np.ndarray, orientation: int | np.ndarray, params: np.ndarray,
              window: Window) -> np.ndarray:
    """The window of a decoded image (formats other than JPEG: a GIF frame may differ from its
    screen), as int32 [top, left, h, w] in the stored frame; `orientation` 1 but for the
    formats whose decoder reports it (Pillow's)."""
    height, width = int(shape[0]), int(shape[1])
    return np.array(window(height, width, int(orientation), params), np.int32)


def resize(image, pre: Preprocess, scaled=None, box=None):
    """uint8 crop -> float32 size x size. A crop decoded at reduced scale (`scaled`) is
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

    if scaled is None or pre.resize not in SCALED_KERNELS:
        return whole()
    return tf.cond(scaled, window, whole)


# For each EXIF orientation 0..8: transpose first?, then reverse rows?, then reverse columns?
_TRANSPOSE = (0, 0, 0, 0, 0, 1, 1, 1, 1)
_REVERSE_ROWS = (0, 0, 0, 1, 1, 0, 0, 1, 1)
_REVERSE_COLUMNS = (0, 0, 1, 1, 0, 0, 1, 1, 0)


def apply_orientation(image, orientation):
    """Turn a stored image upright according to its EXIF orientation tag (1..8).

    Without branches (a 9-way switch_case of rot90s traced 41 functions, half of a run's graph
    build): a transpose with a chosen permutation, then a reverse of the chosen axes (none for
    orientation 1). tf.reverse, not a slice of step -1: that costs 8x as much on 224x224x3.
    """
    import tensorflow as tf

    index = tf.clip_by_value(orientation, 0, 8)
    transpose = tf.gather(tf.constant(_TRANSPOSE), index) > 0
    image = tf.transpose(image, tf.where(transpose, [1, 0, 2], [0, 1, 2]))
    reversed_axes = tf.stack([tf.gather(tf.constant(_REVERSE_ROWS), index) > 0,
                              tf.gather(tf.constant(_REVERSE_COLUMNS), index) > 0])
    return tf.reverse(image, tf.boolean_mask(tf.constant([0, 1]), reversed_axes))
