"""tf.data: bytes -> header check -> decode -> crop/resize -> normalize -> batch -> prefetch.

The predictor's Feed decides the last steps: "float32" normalizes here (model-ready input),
"uint8" stops at the resized crop rounded to uint8 (the predictor normalizes, a quarter of the
bytes); with `tensors` the batches stay TensorFlow tensors, prefetched onto `device` if given.

Every input comes out exactly once, either in a Batch's `refs` (labeled) or in its `errors`.
A failing element is dropped inside tf.data (`ignore_errors`) so the iterator never dies; the
order of elements is kept, so a missing sequence number tells which input failed, and
`diagnose` explains why in Python (failures are rare, so that is cheap). Inputs that must not
be read at all (missing, not a regular file -- a FIFO would block forever --, empty, above
--max-file-bytes) never enter tf.data: they are gaps from the start.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from . import devices, imageinfo, pixels, storage
from .imageinfo import ImageError
from .sources import printable
from .types import ErrorRecord, Feed, ImageRef, Preprocess, ReadLimits, S3Options


@dataclass
class Batch:
    refs: list[ImageRef]
    images: np.ndarray  # [n, size, size, 3]: float32 model-ready, or uint8 pixels (Feed.dtype);
    # a TensorFlow tensor (on Feed.device) with Feed.tensors
    widths: np.ndarray  # original width/height (before EXIF rotation)
    heights: np.ndarray
    errors: list[ErrorRecord] = field(default_factory=list)
    content_sha256: list[str] = field(default_factory=list)  # of each ref's bytes, as read


class ImageReader:
    """Iterate Batches for a stream of ImageRefs; bounded memory, nothing dropped.

    The refs handed out (labeled or in errors) carry a UTF-8-safe `uri`: a file name that is
    not valid UTF-8 is read by its real bytes but written with backslash escapes.
    """

    def __init__(self, refs: Iterable[ImageRef], pre: Preprocess, batch_size: int,
                 limits: ReadLimits = ReadLimits(), s3: S3Options = S3Options(),
                 feed: Feed = Feed()):
        self._refs = refs
        self._feed = feed
        self._s3 = s3
        self._pre = pre
        self._batch_size = batch_size
        self._max_pixels = limits.max_pixels
        self._max_file_bytes = limits.max_file_bytes
        self._scaled_decode = limits.scaled_decode
        self._pending: collections.deque[tuple[int, ImageRef]] = collections.deque()
        self._lock = threading.Lock()
        self._source_error: BaseException | None = None

    def _generate(self) -> Iterator[tuple[int, bytes]]:
        try:
            for seq, ref in enumerate(self._refs):
                with self._lock:
                    self._pending.append((seq, ref))
                if _worth_reading(ref, self._max_file_bytes):
                    yield seq, os.fsencode(ref.uri)
        except Exception as e:  # tf.data would end the stream quietly; re-raised in __iter__
            self._source_error = e

    def __iter__(self) -> Iterator[Batch]:
        import tensorflow as tf

        seqs = tf.data.Dataset.from_generator(
            self._generate,
            output_signature=(tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string)),
        )
        dataset = make_dataset(seqs, self._pre, self._batch_size, self._max_pixels,
                               self._max_file_bytes, self._s3, self._feed.dtype,
                               self._scaled_decode)
        empty = np.zeros((0, self._pre.size, self._pre.size, 3), self._feed.dtype)
        for seq, images, widths, heights, sha in _batches(dataset, self._feed):
            refs, errors = self._settle(set(seq.tolist()), int(seq.max()))
            yield Batch(refs, images, widths, heights, errors, [bytes(h).hex() for h in sha])
        if self._source_error is not None:  # e.g. S3 stopped answering while a manifest was read
            raise self._source_error
        _, errors = self._settle(set(), None)
        if errors:
            yield Batch([], empty, np.zeros(0, np.int32), np.zeros(0, np.int32), errors)

    def _settle(self, seen: set[int], upto: int | None) -> tuple[list[ImageRef], list[ErrorRecord]]:
        """Pop pending inputs up to `upto`: the ones in `seen` are labeled, the others failed."""
        refs, errors = [], []
        while True:
            with self._lock:
                if not self._pending or (upto is not None and self._pending[0][0] > upto):
                    break
                seq, ref = self._pending.popleft()
            if seq in seen:
                refs.append(_printable_ref(ref))
            else:
                errors.append(_diagnose_safely(ref, self._max_pixels, self._max_file_bytes,
                                               self._s3))
        return refs, errors


def _batches(dataset, feed: Feed):
    """(seq, images, widths, heights, sha256) per batch: all numpy, or with `feed.tensors` the images as
    the tf.data tensor itself (prefetched onto `feed.device` when one is planned), so a Keras
    model takes them without a round trip through numpy."""
    if not feed.tensors:
        yield from dataset.as_numpy_iterator()
        return
    import tensorflow as tf

    if feed.device is not None:
        dataset = dataset.apply(tf.data.experimental.prefetch_to_device(feed.device, PREFETCH_BATCHES))
    for seq, images, widths, heights, sha in dataset:
        yield seq.numpy(), images, widths.numpy(), heights.numpy(), sha.numpy()


def _diagnose_safely(ref: ImageRef, max_pixels: int, max_file_bytes: int,
                     s3: S3Options) -> ErrorRecord:
    """diagnose, and should it fail itself (a bug, memory), still one row rather than a dead run."""
    try:
        return diagnose(ref, max_pixels, max_file_bytes, s3)
    except storage.S3Unavailable:  # not this image's fault: the run stops and resumes later
        raise
    except Exception as e:  # noqa: BLE001 -- any failure here must become data
        return ErrorRecord(_printable_ref(ref), "unreadable", printable(
            f"could not be labeled, and explaining why failed too ({type(e).__name__}: {e}); "
            f"the next run retries it"))


def _worth_reading(ref: ImageRef, max_file_bytes: int) -> bool:
    """Sources give file_size None for what is missing or not a regular file."""
    return ref.file_size is not None and 0 < ref.file_size <= max_file_bytes


def _printable_ref(ref: ImageRef) -> ImageRef:
    uri = printable(ref.uri)
    return ref if uri == ref.uri else dataclasses.replace(ref, uri=uri)


# Files read at once. Reading waits on the disk or on S3 (tens of ms per GET), not on a core,
# so it gets more threads than decoding, which gets one per core.
READ_PARALLELISM = 8  # at most 8 x max_file_bytes in flight
# Batches decoded ahead of the model.
PREFETCH_BATCHES = 2


def make_dataset(seqs, pre: Preprocess, batch_size: int, max_pixels: int,
                 max_file_bytes: int = ReadLimits.max_file_bytes, s3: S3Options = S3Options(),
                 feed: str = "float32", scaled_decode: bool = ReadLimits.scaled_decode):
    """(seq, path) dataset -> batches of (seq, image, width, height, sha256); failures are
    dropped. `feed`: the images' dtype, float32 model input or uint8 pixels (see
    image_from_bytes). sha256: the 32-byte digest of the bytes decoded, hashed as they were
    read (no second read), as uint8 so the batch can go to a device whole.

    Fixed parallelism instead of AUTOTUNE: beside a model that uses every core, tf.data's
    autotuner settled run by run on very different parallelism (end to end 112 or 150 images/s
    on the same 2-core host); a thread per core with single-threaded ops is steady at the top.
    """
    import tensorflow as tf

    # No AutoGraph: the graph is written with tf.cond/switch_case already, and converting the
    # Python source took 0.6 s of every run's start-up.
    @tf.autograph.experimental.do_not_convert
    def read(seq, path):
        return (seq, *read_bytes_and_sha256(path, max_file_bytes, s3))

    @tf.autograph.experimental.do_not_convert
    def decode(seq, data, sha):
        image, width, height = image_from_bytes(data, pre, max_pixels, feed=feed,
                                                scaled_decode=scaled_decode)
        return seq, image, width, height, sha

    options = tf.data.Options()
    options.deterministic = True  # failures are found by the gaps in the sequence
    options.autotune.enabled = False
    options.threading.max_intra_op_parallelism = 1  # parallel across images, not inside one
    options.experimental_optimization.apply_default_optimizations = False  # ~0.1 s at start-up
    return (
        seqs.map(read, num_parallel_calls=READ_PARALLELISM)
        .map(decode, num_parallel_calls=devices.cpu_threads())
        .ignore_errors()
        .batch(batch_size)
        .prefetch(PREFETCH_BATCHES)
        .with_options(options)
    )


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


def read_bytes(path, max_file_bytes: int = ReadLimits.max_file_bytes, s3: S3Options = S3Options()):
    """A local path or an s3:// URI (string tensor) -> the file's bytes; fails (the element is
    dropped, then diagnosed) for what is not a regular file or holds more than max_file_bytes.

    Not tf.io.read_file: it opens by name, blocking (a FIFO put in the file's place after the
    listing hangs it forever) and reads whatever is there (a link to /dev/zero never ends).
    A Python read through numpy_function still runs in parallel: os.read releases the GIL.
    """
    import tensorflow as tf

    data = tf.numpy_function(functools.partial(_read_capped_py, s3=s3),
                             [path, np.int64(max_file_bytes)], tf.string, stateful=False)
    data.set_shape([])
    return data


def read_bytes_and_sha256(path, max_file_bytes: int = ReadLimits.max_file_bytes,
                          s3: S3Options = S3Options()):
    """read_bytes, plus the sha256 digest of those bytes (uint8 [32])."""
    import tensorflow as tf

    data, sha = tf.numpy_function(functools.partial(_read_hashed_py, s3=s3),
                                  [path, np.int64(max_file_bytes)], [tf.string, tf.uint8],
                                  stateful=False)
    data.set_shape([])
    sha.set_shape([32])
    return data, sha


def _read_hashed_py(uri: bytes, max_file_bytes, s3: S3Options) -> tuple[bytes, np.ndarray]:
    data = _read_capped_py(uri, max_file_bytes, s3)
    return data, np.frombuffer(hashlib.sha256(data).digest(), np.uint8)


def sha256_hex(data: bytes) -> str:
    """content_sha256 of a file's bytes (hashlib releases the GIL on large buffers)."""
    return hashlib.sha256(data).hexdigest()


def _read_capped_py(uri: bytes, max_file_bytes, s3: S3Options) -> bytes:
    uri, limit = bytes(uri), int(max_file_bytes)
    if uri.startswith(b"s3://"):
        data = storage.read_bytes(os.fsdecode(uri), s3, limit + 1)  # a ranged GET, never more
    else:
        data = read_regular_file(uri, limit + 1)
    if len(data) > limit:
        raise ImageError("too_large", f"the file grew above --max-file-bytes {_mib(limit)}")
    return data


def read_regular_file(path: str | bytes, limit: int) -> bytes:
    """At most `limit` bytes of a regular file (ImageError otherwise). The file is opened
    without blocking and checked by its descriptor, so what is read is what was checked:
    a symlink to a regular file is fine, a FIFO or device swapped in after the listing is not.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ImageError("not_found", f"file not found{_not_a_directory(e)}: "
                         f"{printable(os.fsdecode(path))}") from None
    except OSError as e:
        raise ImageError("unreadable", f"cannot read file: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _FILE_TYPES.get(stat.S_IFMT(st.st_mode), "a special file")
            raise ImageError("unreadable", f"not a regular file ({kind}); it is not read")
        return _read_at_most(fd, limit, st.st_size)
    except OSError as e:
        raise ImageError("unreadable", f"cannot read file: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _read_at_most(fd: int, limit: int, size_hint: int) -> bytes:
    """Read until EOF or `limit` bytes; the first read asks for the size fstat gave (+1 to see
    EOF at once), later ones (a file still growing) for 1 MiB at a time."""
    chunks, left = [], limit
    want = min(left, size_hint + 1)
    while left > 0:
        chunk = os.read(fd, want)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
        want = min(left, 2**20)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def image_from_bytes(data, pre: Preprocess, max_pixels: int, window=None, feed: str = "float32",
                     scaled_decode: bool = True):
    """Encoded bytes -> (model-ready image, original width, height); see load_image. With feed
    "uint8" the image is the resized crop rounded to uint8 instead, normalized later by the
    predictor (pixels.normalize)."""
    import tensorflow as tf

    if window is None:
        def window(height, width, orientation):
            return crop_window(height, width, pre.crop_fraction, orientation)

    fmt, width, height, orientation, prepare, last_block = _inspect_in_graph(data, max_pixels)
    data = tf.cond(prepare > 0, lambda: _prepare_in_graph(data, max_pixels), lambda: data)
    # uint8 until the resize (which reads uint8, gives float32): a float copy of a
    # 90-megapixel crop would take 1 GB. Turning upright after the resize is exact (the
    # crop was chosen in the upright frame) and cheap (224x224, not the full crop); it turns
    # the float image (a uint8 transpose makes oneDNN print a complaint on every run).
    scaled = scaled_decode and pre.resize in _SCALED_KERNELS
    crop, ratio, box = _decode_crop(data, fmt, width, height, orientation, window,
                                    _scaled_target(pre.size) if scaled else None, last_block)
    crop = _refuse_cut_jpeg(crop, data, fmt)
    image = _apply_orientation(_resize(crop, pre, ratio, box), orientation)
    image = pixels.to_uint8(image) if feed == "uint8" else pixels.normalize(image, pre)
    image = tf.ensure_shape(image, (pre.size, pre.size, 3))
    return image, width, height


def _inspect_py(data: bytes, max_pixels: int) -> np.ndarray:
    data = bytes(data)
    info = imageinfo.inspect(data, len(data), int(max_pixels), defer_cut_check=True)
    return np.array([imageinfo.FORMAT_CODES[info.format], info.width, info.height,
                     info.orientation, info.prepare, info.check_last_block], np.int32)


def _inspect_in_graph(data, max_pixels: int):
    """imageinfo.inspect on the whole file (a JPEG's structure is checked to its end): format
    code, width, height, orientation, prepare, check_last_block."""
    import tensorflow as tf

    out = tf.numpy_function(_inspect_py, [data, np.int64(max_pixels)], tf.int32, stateful=False)
    out.set_shape([6])
    return tuple(tf.unstack(out))


def _refuse_cut_jpeg(crop, data, fmt):
    """libjpeg decodes a baseline JPEG cut short (and given an end marker) with the missing
    part exactly gray (128): when the crop's last row is that, a strict decode decides."""
    import tensorflow as tf

    suspect = tf.logical_and(tf.equal(fmt, imageinfo.FORMAT_CODES["jpeg"]),
                             tf.reduce_all(tf.equal(crop[-1], 128)))
    return _strict_jpeg_if(suspect, data, crop)


def _refuse_cut_at_last_block(image, data):
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


def _prepare_py(data: bytes, max_pixels: int) -> bytes:
    data = bytes(data)
    return imageinfo.prepare(data, imageinfo.probe(data), int(max_pixels))


def _prepare_in_graph(data, max_pixels: int):
    import tensorflow as tf

    out = tf.numpy_function(_prepare_py, [data, np.int64(max_pixels)], tf.string, stateful=False)
    out.set_shape([])
    return out


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


def _decode_crop(data, fmt, width, height, orientation, window, target=None,
                 last_block=False):
    """(uint8 [h, w, 3] crop, DCT ratio, window box) for the crop `window` chooses.

    JPEG crops inside the decoder (its header size is exact); the others crop by the decoded
    shape (a GIF frame may differ from its screen). With a `target` side, a JPEG whose window
    is at least 2x `target` decodes at 1/2, 1/4 or 1/8 scale (`dct_ratio`): the crop is
    then the scaled window's enclosing pixels and `box` (float [top, left, h, w] in the crop's
    pixels) where the window lies in it, for `_resize` to resample exactly that. With
    `last_block` (imageinfo's check_last_block), a JPEG decodes on to the image's bottom-right
    corner, which `_refuse_cut_at_last_block` checks before the crop is cut out.
    """
    import tensorflow as tf

    def jpeg():
        top, left, h, w = tf.unstack(window(height, width, orientation))
        index = _dct_ratio_index(h, w, target)
        ratio = tf.bitwise.left_shift(1, index)

        def at(r):
            return lambda: tf.io.decode_and_crop_jpeg(
                data, _enclosing_window(top, left, h, w, r), channels=3, ratio=r)

        def to_corner(r):
            def decode():
                image = tf.io.decode_and_crop_jpeg(
                    data, _enclosing_window(top, left, height - top, width - left, r),
                    channels=3, ratio=r)
                crop = _enclosing_window(top, left, h, w, r)
                return _refuse_cut_at_last_block(image, data)[:crop[2], :crop[3]]
            return decode

        def decoded(decoder):
            return tf.switch_case(index, [decoder(r) for r in _RATIOS]) if target else decoder(1)()

        image = tf.cond(tf.cast(last_block, tf.bool), lambda: decoded(to_corner),
                        lambda: decoded(at))
        return image, ratio, _window_box(top, left, h, w, ratio)

    def webp():  # TF decodes WebP only to its own channel count (RGB or RGBA)
        image = tf.io.decode_image(data, channels=0, expand_animations=False, dtype=tf.uint8)
        return _unscaled(_crop(image[..., :3], window))

    def other():
        image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
        return _unscaled(_crop(image, window))

    special = {"jpeg": jpeg, "webp": webp}
    image, ratio, box = tf.switch_case(fmt, [special.get(name, other) for name in imageinfo.DECODABLE])
    return tf.ensure_shape(image, [None, None, 3]), ratio, box


# libjpeg's DCT-domain scales: a JPEG decodes at 1/r of each side for r in these
_RATIOS = (1, 2, 4, 8)
# The resize methods whose kernel tf.raw_ops.ScaleAndTranslate has too (the same weights), so
# a scaled crop can be resampled at the window's sub-pixel position. Others never scale.
_SCALED_KERNELS = {"bicubic": "keyscubic", "bilinear": "triangle", "lanczos3": "lanczos3",
                   "lanczos5": "lanczos5", "gaussian": "gaussian", "mitchellcubic": "mitchellcubic"}


# How many times the model input a scaled crop keeps at least. Measured on the shared sample
# upscaled to 12 MP: keeping 1x (1/8 scale) agreed with full decode on 95 of 100 top-1s and
# lost 2 points of top-1; 1.5x (1/4 scale) agreed on 99 and lost 1 (README, accuracy).
SCALED_DECODE_MARGIN = 1.5


def _scaled_target(size: int) -> int:
    return math.ceil(size * SCALED_DECODE_MARGIN)


def dct_ratio(h, w, target: int | None):
    """The largest DCT scale 1/r (r in 1, 2, 4, 8) that leaves an h x w window at least
    `target` pixels on both sides (1 without a target)."""
    import tensorflow as tf

    return tf.bitwise.left_shift(1, _dct_ratio_index(h, w, target))


def _dct_ratio_index(h, w, target: int | None):
    import tensorflow as tf

    if not target:
        return tf.constant(0)
    short = tf.minimum(h, w)
    return tf.add_n([tf.cast(short >= r * target, tf.int32) for r in _RATIOS[1:]])


def _enclosing_window(top, left, h, w, r: int):
    """The window scaled by 1/r, widened to whole pixels of the scaled image (never past its
    edge: libjpeg's scaled side is ceil(side / r), and the window ends inside the image)."""
    import tensorflow as tf

    y0, x0 = top // r, left // r
    y1, x1 = -((-(top + h)) // r), -((-(left + w)) // r)  # ceil
    return tf.stack([y0, x0, y1 - y0, x1 - x0])


def _window_box(top, left, h, w, ratio):
    """Where the window lies in its enclosing scaled crop: float [top, left, h, w]."""
    import tensorflow as tf

    r = tf.cast(ratio, tf.float32)
    f = functools.partial(tf.cast, dtype=tf.float32)
    return tf.stack([f(top) / r - f(top // ratio), f(left) / r - f(left // ratio),
                     f(h) / r, f(w) / r])


def _unscaled(crop):
    import tensorflow as tf

    shape = tf.cast(tf.shape(crop), tf.float32)
    return crop, tf.constant(1), tf.stack([0.0, 0.0, shape[0], shape[1]])


def _crop(image, window):
    import tensorflow as tf

    shape = tf.shape(image)
    top, left, h, w = tf.unstack(window(shape[0], shape[1], 1))
    return image[top:top + h, left:left + w]


# For each EXIF orientation 0..8: transpose first?, then reverse rows?, then reverse columns?
_TRANSPOSE = (0, 0, 0, 0, 0, 1, 1, 1, 1)
_REVERSE_ROWS = (0, 0, 0, 1, 1, 0, 0, 1, 1)
_REVERSE_COLUMNS = (0, 0, 1, 1, 0, 0, 1, 1, 0)


def _apply_orientation(image, orientation):
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


def _resize_normalize(image, pre: Preprocess):
    """uint8 crop -> float32 model input (the float feed, an upright crop)."""
    image = pixels.normalize(_resize(image, pre), pre)
    image.set_shape((pre.size, pre.size, 3))
    return image


def _resize(image, pre: Preprocess, ratio=None, box=None):
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
            translation=-box[:2] * scale, kernel_type=_SCALED_KERNELS[pre.resize], antialias=False)
        return out[0]

    if ratio is None or pre.resize not in _SCALED_KERNELS:
        return whole()
    return tf.cond(ratio > 1, window, whole)


def diagnose(ref: ImageRef, max_pixels: int, max_file_bytes: int = ReadLimits.max_file_bytes,
             s3: S3Options = S3Options()) -> ErrorRecord:
    """Explain why an input could not be labeled (runs only for failures). Reads at most
    max_file_bytes and never opens what is not a regular file. The record carries the sha256
    of the bytes read, when any were."""
    out = _printable_ref(ref)
    if ref.entry_error:  # a manifest entry that names no file: nothing to read
        return ErrorRecord(out, "invalid_entry", ref.entry_error)
    try:
        if storage.is_s3(ref.uri):
            data = _read_s3_object(ref, max_file_bytes, s3)
        else:
            data = _read_regular_file(ref.uri, max_file_bytes)
    except ImageError as e:  # the size when the header gave it (unsupported JPEG/BMP kinds)
        return ErrorRecord(out, e.kind, printable(str(e)), e.width, e.height)
    return dataclasses.replace(_diagnose_bytes(out, data, max_pixels),
                               content_sha256=sha256_hex(data))


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


_FILE_TYPES = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def _not_a_directory(e: OSError) -> str:
    """ENOTDIR: a directory in the path is a file (`photo.jpg/x.jpg`); it is as missing as
    ENOENT, and just as permanent while the tree stays so."""
    return " (a directory in its path is a file)" if isinstance(e, NotADirectoryError) else ""


def _read_regular_file(path: str, max_file_bytes: int) -> bytes:
    """read_regular_file, with a plainer reason from a stat by name first."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        broken = " (a broken symlink)" if os.path.islink(path) else _not_a_directory(e)
        raise ImageError("not_found", f"file not found{broken}: {path}") from None
    except OSError as e:
        raise ImageError("unreadable", f"cannot read file: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _FILE_TYPES.get(stat.S_IFMT(st.st_mode), "a special file")
        raise ImageError("unreadable", f"not a regular file ({kind}); it is not read")
    if st.st_size == 0:
        raise ImageError("empty_file", "the file is empty (0 bytes)")
    if st.st_size > max_file_bytes:
        raise ImageError("too_large", f"the file is {_mib(st.st_size)}, above --max-file-bytes "
                         f"{_mib(max_file_bytes)}; it is not read")
    data = read_regular_file(path, max_file_bytes + 1)  # the stat above only names the problem
    if len(data) > max_file_bytes:
        raise ImageError("too_large", f"the file grew above --max-file-bytes {_mib(max_file_bytes)}")
    return data


def _read_s3_object(ref: ImageRef, max_file_bytes: int, s3: S3Options) -> bytes:
    if ref.file_size == 0:
        raise ImageError("empty_file", "the object is empty (0 bytes)")
    if ref.file_size is not None and ref.file_size > max_file_bytes:
        raise ImageError("too_large", f"the object is {_mib(ref.file_size)}, above "
                         f"--max-file-bytes {_mib(max_file_bytes)}; it is not read")
    try:
        data = storage.read_bytes(ref.uri, s3, max_file_bytes + 1)
    except FileNotFoundError:
        raise ImageError("not_found", f"object not found: {ref.uri}") from None
    except OSError as e:  # still failing after the retries: S3 is down, not this image
        raise storage.S3Unavailable(f"S3 unreachable: cannot read {ref.uri} after "
                                    f"{s3.max_attempts} attempts: {e}") from e
    if len(data) > max_file_bytes:
        raise ImageError("too_large", f"the object grew above --max-file-bytes {_mib(max_file_bytes)}")
    return data


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


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
