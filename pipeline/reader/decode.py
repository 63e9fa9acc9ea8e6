"""One image: encoded bytes -> header check and plan (one Python call) -> decode of the crop
-> resize -> upright -> model input (or uint8 pixels for the predictor to normalize)."""
from __future__ import annotations

import functools
import os

import numpy as np

from .. import imageinfo, inputs, pillow_decode, pixels
from ..types import Preprocess, ReadLimits, S3Options
from . import checks, geometry
from .geometry import Plan, Window
from .reading import as_bytes, bytes_tensor, read_capped, s3_read_pool, sha256_digest


def load_image(path, pre: Preprocess, max_pixels: int, window: Window | None = None,
               max_file_bytes: int = ReadLimits.max_file_bytes, s3: S3Options = S3Options(),
               scaled_decode: bool = ReadLimits.scaled_decode, params=None):
    """Path tensor -> (model-ready image, original width, height), as labeling reads it.

    `window(height, width, orientation, params) -> (top, left, h, w)`, a Python function given
    the graph's float32 vector `params`, replaces the centered crop (fine-tuning passes random
    crops); inspection, decoding, resizing, normalization and orientation stay the same.
    `scaled_decode`: a JPEG whose window is at least 3x the model input decodes at reduced scale
    (libjpeg's DCT scaling) keeping 1.5x the input (`geometry.dct_ratio`).
    """
    return image_from_bytes(bytes_tensor(path, max_file_bytes, s3), pre, max_pixels, window,
                            scaled_decode=scaled_decode, params=params)


def image_from_bytes(data, pre: Preprocess, max_pixels: int, window: Window | None = None,
                     feed: str = "float32", scaled_decode: bool = True, params=None):
    """Encoded bytes -> (model-ready image, original width, height); see load_image. With feed
    "uint8" the image is the resized crop rounded to uint8 instead, normalized later by the
    predictor (pixels.normalize)."""
    import tensorflow as tf

    window = window or geometry.center_window(pre.crop_fraction)
    target = geometry.scaled_target(pre, scaled_decode)
    params = tf.zeros([0]) if params is None else params
    planner = functools.partial(_planned_py, max_pixels=max_pixels, window=window, target=target)
    data, plan, box = tf.numpy_function(planner, [data, params], [tf.string, tf.int32, tf.float32],
                                        stateful=False)
    _set_shapes(data, plan, box)
    plan = unpacked(plan)
    image = image_from_plan(data, plan, box, pre, window, target, params, max_pixels, feed)
    return image, plan.width, plan.height


def chunk_bytes_and_plans(seqs, paths, pre: Preprocess, max_pixels: int, max_file_bytes: int,
                          s3: S3Options, scaled_decode: bool):
    """A chunk of inputs, (seqs int64 [n], paths string [n]) -> the ones read and planned:
    (seqs [m], bytes [m], sha256 uint8 [m, 32], plans int32 [m, 12] (`unpacked`), boxes
    [m, 4]). The read, the hash, the checks and the labeling window's plan of a whole chunk in
    one Python call (a call per image cost more than the Python work itself), so each file's
    bytes cross into Python once. An input that fails any of them is left out: its missing
    seq is diagnosed afterwards. Local files are read one after the other (from the page cache
    a read is CPU work, and more threads only contend for the GIL); S3 objects on
    reading.S3_READ_THREADS threads, as a GET waits on the network, not on a core."""
    import tensorflow as tf

    reader = functools.partial(_read_planned_chunk_py, max_file_bytes=max_file_bytes, s3=s3,
                               max_pixels=max_pixels, window=geometry.center_window(pre.crop_fraction),
                               target=geometry.scaled_target(pre, scaled_decode))
    seqs, data, sha, plans, boxes = tf.numpy_function(
        reader, [seqs, paths], [tf.int64, tf.string, tf.uint8, tf.int32, tf.float32], stateful=False)
    seqs.set_shape([None])
    data.set_shape([None])
    sha.set_shape([None, 32])
    plans.set_shape([None, len(Plan._fields)])
    boxes.set_shape([None, 4])
    return seqs, data, sha, plans, boxes


def labeling_image(data, plan: Plan, box, pre: Preprocess, max_pixels: int, scaled_decode: bool,
                   feed: str):
    """image_from_plan for chunk_bytes_and_plans' output (the centered window, no params)."""
    import tensorflow as tf

    return image_from_plan(data, plan, box, pre, geometry.center_window(pre.crop_fraction),
                           geometry.scaled_target(pre, scaled_decode), tf.zeros([0]), max_pixels,
                           feed)


def _planned_py(data: bytes, params: np.ndarray, max_pixels: int, window: Window,
                target: int | None) -> tuple[bytes, np.ndarray, np.ndarray]:
    data, info = checks.checked(as_bytes(data), max_pixels)
    code = imageinfo.FORMAT_CODES["pillow" if info.pillow else info.format]
    plan, box = geometry.plan(code, info.width, info.height, info.orientation,
                              info.check_last_block, window, target, params,
                              jpeg=code == imageinfo.FORMAT_CODES["jpeg"])
    return data, plan, box


def _read_planned_chunk_py(seqs: np.ndarray, uris: np.ndarray, max_file_bytes: int,
                           s3: S3Options, max_pixels: int, window: Window, target: int | None):
    def one(uri: bytes):
        try:
            data = read_capped(uri, max_file_bytes, s3)
            sha = sha256_digest(data)  # of the bytes as read, before any prepare
            return (*_planned_py(data, _NO_PARAMS, max_pixels, window, target), sha)
        except Exception:  # any failure, as tf.data's ignore_errors drops it: diagnosed later
            return None

    names = [as_bytes(u) for u in uris]
    if any(inputs.is_remote(os.fsdecode(u)) for u in names):
        done = list(s3_read_pool().map(one, names))
    else:
        done = [one(u) for u in names]
    kept = [i for i, r in enumerate(done) if r is not None]
    data = np.empty(len(kept), object)
    data[:] = [done[i][0] for i in kept]
    return (np.asarray(seqs)[kept].astype(np.int64), data,
            np.array([done[i][3] for i in kept], np.uint8).reshape(-1, 32),
            np.array([done[i][1] for i in kept], np.int32).reshape(-1, len(Plan._fields)),
            np.array([done[i][2] for i in kept], np.float32).reshape(-1, 4))


_NO_PARAMS = np.zeros(0, np.float32)


def _set_shapes(data, plan, box) -> None:
    data.set_shape([])
    plan.set_shape([len(Plan._fields)])
    box.set_shape([4])


def unpacked(plan) -> Plan:
    """An int32 [12] plan tensor as a Plan of scalar tensors."""
    import tensorflow as tf

    return Plan(*tf.unstack(plan))


def image_from_plan(data, plan: Plan, box, pre: Preprocess, window: Window, target: int | None,
                    params, max_pixels: int, feed: str = "float32"):
    """Decode, crop, resize, turn upright and normalize one image as `plan` says."""
    crop, orientation = crop_of(data, plan, window, target, params, max_pixels)
    return model_input(crop, orientation, plan, box, pre, target, feed)


def crop_of(data, plan: Plan, window: Window, target: int | None, params, max_pixels: int):
    """(uint8 [h, w, 3] pixels that enclose the window, EXIF orientation still to apply). JPEG:
    decoded at the plan's scale and cut-checked; other formats: decoded whole, then cropped;
    the formats Pillow decodes come with the orientation their decoder reports."""
    import tensorflow as tf

    def jpeg():
        place = tf.stack([plan.top, plan.left, plan.decode_height, plan.decode_width])

        def at(r):
            return lambda: tf.io.decode_and_crop_jpeg(data, place, channels=3, ratio=r)

        decoded = tf.switch_case(plan.ratio_index, [at(r) for r in geometry.RATIOS]) if target else at(1)()
        crop = decoded[:plan.crop_height, :plan.crop_width]
        return checks.refuse_cut_jpeg(crop, decoded, plan.last_block, data), plan.orientation

    def webp():  # TF decodes WebP only to its own channel count (RGB or RGBA)
        image = tf.io.decode_image(data, channels=0, expand_animations=False, dtype=tf.uint8)
        return _cropped(image[..., :3], window, params), plan.orientation

    def other():
        image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
        return _cropped(image, window, params), plan.orientation

    def pillow():
        return _pillow_cropped(data, window, params, max_pixels)

    special = {"jpeg": jpeg, "webp": webp, "pillow": pillow}
    crop, orientation = tf.switch_case(plan.format,
                                       [special.get(name, other) for name in imageinfo.FORMAT_CODES])
    return tf.ensure_shape(crop, [None, None, 3]), orientation


def model_input(crop, orientation, plan: Plan, box, pre: Preprocess, target: int | None,
                feed: str = "float32"):
    """uint8 crop -> upright size x size model input: float32 normalized, or uint8 pixels
    (feed)."""
    import tensorflow as tf

    # uint8 until the resize (which reads uint8, gives float32): a float copy of a
    # 90-megapixel crop would take 1 GB. Turning upright after the resize is exact (the
    # crop was chosen in the upright frame) and cheap (224x224, not the full crop); it turns
    # the float image (a uint8 transpose makes oneDNN print a complaint on every run).
    scaled = plan.ratio_index > 0 if target else None

    def turned():
        return geometry.apply_orientation(geometry.resize(crop, pre, scaled, box), orientation)

    # Most photos: full scale, already upright. One branch for them, the same values as
    # turned()'s (an upright image is not transposed or reversed), without the branchless
    # orientation's reverse (a copy of the whole float image) and the scaled resize's cond.
    plain = orientation <= 1  # 0: no tag; apply_orientation leaves both as they are
    if scaled is not None:
        plain = tf.logical_and(plain, tf.logical_not(scaled))
    image = tf.cond(plain, lambda: geometry.resize(crop, pre), turned)
    image = pixels.to_uint8(image) if feed == "uint8" else pixels.normalize(image, pre)
    return tf.ensure_shape(image, (pre.size, pre.size, 3))


def _cropped(image, window: Window, params):
    """The part of a decoded image (not a JPEG) that `window` chooses, from its decoded shape."""
    import tensorflow as tf

    where = tf.numpy_function(functools.partial(geometry.window_of, window=window),
                              [tf.shape(image), tf.constant(1), params], tf.int32, stateful=False)
    top, left, h, w = tf.unstack(tf.ensure_shape(where, [4]))
    return image[top:top + h, left:left + w]


def _pillow_cropped(data, window: Window, params, max_pixels: int):
    """pillow_decode.decode, cropped to the window: (uint8 [h, w, 3] as stored, the EXIF
    orientation still to apply, which the window was chosen for)."""
    import tensorflow as tf

    def decode(data: bytes, params: np.ndarray) -> tuple[np.ndarray, np.int32]:
        data = as_bytes(data)
        image, turn = pillow_decode.decode(data, imageinfo.probe(data).format, max_pixels)
        top, left, h, w = geometry.window_of(np.array(image.shape), turn, params, window)
        return np.ascontiguousarray(image[top:top + h, left:left + w]), np.int32(turn)

    image, orientation = tf.numpy_function(decode, [data, params], [tf.uint8, tf.int32],
                                           stateful=False)
    image.set_shape([None, None, 3])
    orientation.set_shape([])
    return image, orientation
