"""One image as graph ops: encoded bytes -> header check -> decode of the crop -> resize ->
upright -> model input (or uint8 pixels for the predictor to normalize)."""
from __future__ import annotations

import numpy as np

from .. import imageinfo, pillow_decode, pixels
from ..types import Preprocess, ReadLimits, S3Options
from . import geometry
from .checks import inspect_in_graph, prepare_in_graph, refuse_cut_at_last_block, refuse_cut_jpeg
from .reading import read_bytes


def load_image(path, pre: Preprocess, max_pixels: int, window=None,
               max_file_bytes: int = ReadLimits.max_file_bytes, s3: S3Options = S3Options(),
               scaled_decode: bool = ReadLimits.scaled_decode):
    """Path tensor -> (model-ready image, original width, height), as labeling reads it.

    `window(height, width, orientation) -> [top, left, h, w]` replaces the centered crop
    (fine-tuning passes random crops); inspection, decoding, resizing, normalization and
    orientation stay the same. `scaled_decode`: a JPEG whose window is at least 3x the model
    input decodes at reduced scale (libjpeg's DCT scaling) keeping 1.5x the input (`dct_ratio`).
    """
    return image_from_bytes(read_bytes(path, max_file_bytes, s3), pre, max_pixels, window,
                            scaled_decode=scaled_decode)


def image_from_bytes(data, pre: Preprocess, max_pixels: int, window=None, feed: str = "float32",
                     scaled_decode: bool = True):
    """Encoded bytes -> (model-ready image, original width, height); see load_image. With feed
    "uint8" the image is the resized crop rounded to uint8 instead, normalized later by the
    predictor (pixels.normalize)."""
    import tensorflow as tf

    if window is None:
        def window(height, width, orientation):
            return geometry.crop_window(height, width, pre.crop_fraction, orientation)

    fmt, width, height, orientation, prepare, last_block = inspect_in_graph(data, max_pixels)
    data = tf.cond(prepare > 0, lambda: prepare_in_graph(data, max_pixels), lambda: data)
    # uint8 until the resize (which reads uint8, gives float32): a float copy of a
    # 90-megapixel crop would take 1 GB. Turning upright after the resize is exact (the
    # crop was chosen in the upright frame) and cheap (224x224, not the full crop); it turns
    # the float image (a uint8 transpose makes oneDNN print a complaint on every run).
    scaled = scaled_decode and pre.resize in geometry.SCALED_KERNELS
    crop, ratio, box, orientation = decode_crop(
        data, fmt, width, height, orientation, window,
        geometry.scaled_target(pre.size) if scaled else None, last_block, max_pixels)
    crop = refuse_cut_jpeg(crop, data, fmt)
    image = geometry.apply_orientation(geometry.resize(crop, pre, ratio, box), orientation)
    image = pixels.to_uint8(image) if feed == "uint8" else pixels.normalize(image, pre)
    image = tf.ensure_shape(image, (pre.size, pre.size, 3))
    return image, width, height


def decode_crop(data, fmt, width, height, orientation, window, target=None,
                last_block=False, max_pixels=ReadLimits.max_pixels):
    """(uint8 [h, w, 3] crop, DCT ratio, window box, orientation) for the crop `window` chooses.

    JPEG crops inside the decoder (its header size is exact); the others crop by the decoded
    shape (a GIF frame may differ from its screen). With a `target` side, a JPEG whose window
    is at least 2x `target` decodes at 1/2, 1/4 or 1/8 scale (`dct_ratio`): the crop is
    then the scaled window's enclosing pixels and `box` (float [top, left, h, w] in the crop's
    pixels) where the window lies in it, for `resize` to resample exactly that. With
    `last_block` (imageinfo's check_last_block), a JPEG decodes on to the image's bottom-right
    corner, which `refuse_cut_at_last_block` checks before the crop is cut out. The formats
    Pillow decodes (fmt "pillow") come with the orientation their decoder reports.
    """
    import tensorflow as tf

    enclosing = geometry.enclosing_window

    def jpeg():
        top, left, h, w = tf.unstack(window(height, width, orientation))
        index = geometry.dct_ratio_index(h, w, target)
        ratio = tf.bitwise.left_shift(1, index)

        def at(r):
            return lambda: tf.io.decode_and_crop_jpeg(
                data, enclosing(top, left, h, w, r), channels=3, ratio=r)

        def to_corner(r):
            def decode():
                image = tf.io.decode_and_crop_jpeg(
                    data, enclosing(top, left, height - top, width - left, r),
                    channels=3, ratio=r)
                crop = enclosing(top, left, h, w, r)
                return refuse_cut_at_last_block(image, data)[:crop[2], :crop[3]]
            return decode

        def decoded(decoder):
            return tf.switch_case(index, [decoder(r) for r in geometry.RATIOS]) if target else decoder(1)()

        image = tf.cond(tf.cast(last_block, tf.bool), lambda: decoded(to_corner),
                        lambda: decoded(at))
        return image, ratio, geometry.window_box(top, left, h, w, ratio), orientation

    def webp():  # TF decodes WebP only to its own channel count (RGB or RGBA)
        image = tf.io.decode_image(data, channels=0, expand_animations=False, dtype=tf.uint8)
        return (*geometry.unscaled(geometry.crop(image[..., :3], window)), orientation)

    def other():
        image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
        return (*geometry.unscaled(geometry.crop(image, window)), orientation)

    def pillow():
        image, turn = _pillow_in_graph(data, max_pixels)
        return (*geometry.unscaled(geometry.crop(image, window, turn)), turn)

    special = {"jpeg": jpeg, "webp": webp, "pillow": pillow}
    image, ratio, box, orientation = tf.switch_case(
        fmt, [special.get(name, other) for name in imageinfo.FORMAT_CODES])
    return tf.ensure_shape(image, [None, None, 3]), ratio, box, orientation


def _pillow_py(data: bytes, max_pixels: int) -> tuple[np.ndarray, np.int32]:
    data = bytes(data)
    pixels, orientation = pillow_decode.decode(data, imageinfo.probe(data).format, int(max_pixels))
    return pixels, np.int32(orientation)


def _pillow_in_graph(data, max_pixels: int):
    """pillow_decode.decode: (uint8 [h, w, 3] as stored, EXIF orientation still to apply)."""
    import tensorflow as tf

    image, orientation = tf.numpy_function(_pillow_py, [data, np.int64(max_pixels)],
                                           [tf.uint8, tf.int32], stateful=False)
    image.set_shape([None, None, 3])
    orientation.set_shape([])
    return image, orientation
