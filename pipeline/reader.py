"""tf.data: bytes -> header check -> decode -> crop/resize -> normalize -> batch -> prefetch.

Every input comes out exactly once, either in a Batch's `refs` (labeled) or in its `errors`.
A failing element is dropped inside tf.data (`ignore_errors`) so the iterator never dies; the
order of elements is kept, so a missing sequence number tells which input failed, and
`diagnose` explains why in Python (failures are rare, so that is cheap).
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from . import imageinfo, storage
from .imageinfo import ImageError
from .models.registry import Preprocess
from .sources import ImageRef


@dataclass(frozen=True)
class ErrorRecord:
    ref: ImageRef
    kind: str
    message: str
    width: int | None = None
    height: int | None = None


@dataclass
class Batch:
    refs: list[ImageRef]
    images: np.ndarray  # float32 [n, size, size, 3], model-ready
    widths: np.ndarray  # original width/height (before EXIF rotation)
    heights: np.ndarray
    errors: list[ErrorRecord] = field(default_factory=list)


class ImageReader:
    """Iterate Batches for a stream of ImageRefs; bounded memory, nothing dropped."""

    def __init__(self, refs: Iterable[ImageRef], pre: Preprocess, batch_size: int,
                 max_pixels: int):
        self._refs = refs
        self._pre = pre
        self._batch_size = batch_size
        self._max_pixels = max_pixels
        self._pending: collections.deque[tuple[int, ImageRef]] = collections.deque()
        self._lock = threading.Lock()
        self._source_error: BaseException | None = None

    def _generate(self) -> Iterator[tuple[int, str]]:
        try:
            for seq, ref in enumerate(self._refs):
                with self._lock:
                    self._pending.append((seq, ref))
                yield seq, ref.uri
        except Exception as e:  # tf.data would end the stream quietly; re-raised in __iter__
            self._source_error = e

    def __iter__(self) -> Iterator[Batch]:
        import tensorflow as tf

        seqs = tf.data.Dataset.from_generator(
            self._generate,
            output_signature=(tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string)),
        )
        dataset = make_dataset(seqs, self._pre, self._batch_size, self._max_pixels)
        empty = np.zeros((0, self._pre.size, self._pre.size, 3), np.float32)
        for seq, images, widths, heights in dataset.as_numpy_iterator():
            refs, errors = self._settle(set(seq.tolist()), int(seq.max()))
            yield Batch(refs, images, widths, heights, errors)
        if self._source_error is not None:
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
                refs.append(ref)
            else:
                errors.append(diagnose(ref, self._max_pixels))
        return refs, errors


def make_dataset(seqs, pre: Preprocess, batch_size: int, max_pixels: int):
    """(seq, uri) dataset -> batches of (seq, image, width, height); failures are dropped."""
    import tensorflow as tf

    def load(seq, uri):
        data = tf.cond(tf.strings.regex_full_match(uri, "s3://.*"),
                       lambda: _read_s3_in_graph(uri), lambda: tf.io.read_file(uri))
        fmt, width, height, orientation = _probe_in_graph(data, max_pixels)
        image = tf.cast(_decode_crop(data, fmt, width, height, pre), tf.float32)
        image = _apply_orientation(image, orientation)
        return seq, _resize_normalize(image, pre), width, height

    options = tf.data.Options()
    options.deterministic = True  # failures are found by the gaps in the sequence
    return (
        seqs.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        .ignore_errors()
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )


def _read_s3_py(uri: bytes) -> bytes:
    return storage.read_bytes(uri.decode())


def _read_s3_in_graph(uri):
    """pyarrow releases the GIL while it reads, so the parallel map reads objects in parallel."""
    import tensorflow as tf

    data = tf.numpy_function(_read_s3_py, [uri], tf.string, stateful=False)
    data.set_shape([])
    return data


def _probe_py(head: bytes, max_pixels: int) -> np.ndarray:
    info = imageinfo.probe(bytes(head))
    imageinfo.check_size(info, int(max_pixels))
    code = imageinfo.FORMAT_CODES[info.format]
    return np.array([code, info.width, info.height, info.orientation], np.int32)


def _probe_in_graph(data, max_pixels: int):
    import tensorflow as tf

    head = tf.strings.substr(data, 0, imageinfo.HEAD_BYTES)
    out = tf.numpy_function(_probe_py, [head, np.int64(max_pixels)], tf.int32, stateful=False)
    out.set_shape([4])
    return out[0], out[1], out[2], out[3]


def crop_window(height, width, crop_fraction: float | None):
    """Centered square of crop_fraction x the shorter side (TF's EfficientNet eval recipe)."""
    import tensorflow as tf

    if crop_fraction is None:
        return tf.stack([0, 0, height, width])
    side = tf.maximum(1, tf.cast(crop_fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32))
    return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def _decode_crop(data, fmt, width, height, pre: Preprocess):
    import tensorflow as tf

    window = crop_window(height, width, pre.crop_fraction)

    def jpeg():
        return tf.io.decode_and_crop_jpeg(data, window, channels=3)

    def other():
        image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
        return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])

    return tf.cond(tf.equal(fmt, imageinfo.FORMAT_CODES["jpeg"]), jpeg, other)


def _apply_orientation(image, orientation):
    """Turn a stored image upright according to its EXIF orientation tag (1..8)."""
    import tensorflow as tf

    branches = [
        lambda: image,
        lambda: image,
        lambda: tf.image.flip_left_right(image),
        lambda: tf.image.rot90(image, 2),
        lambda: tf.image.flip_up_down(image),
        lambda: tf.image.transpose(image),
        lambda: tf.image.rot90(image, 3),
        lambda: tf.image.rot90(tf.image.transpose(image), 2),
        lambda: tf.image.rot90(image, 1),
    ]
    return tf.switch_case(tf.clip_by_value(orientation, 0, 8), branches)


def _resize_normalize(image, pre: Preprocess):
    import tensorflow as tf

    image = tf.image.resize(image, (pre.size, pre.size), method=pre.resize)
    if pre.bgr:
        image = image[..., ::-1]
    image = (image - tf.constant(pre.mean, tf.float32)) / tf.constant(pre.std, tf.float32)
    image.set_shape((pre.size, pre.size, 3))
    return image


def diagnose(ref: ImageRef, max_pixels: int) -> ErrorRecord:
    """Explain why an input could not be labeled (runs only for failures)."""
    try:
        data = _read_for_diagnosis(ref.uri)
    except FileNotFoundError:
        return ErrorRecord(ref, "not_found", f"file not found: {ref.uri}")
    except IsADirectoryError:
        return ErrorRecord(ref, "unreadable", f"is a directory: {ref.uri}")
    except OSError as e:
        return ErrorRecord(ref, "unreadable", f"cannot read file: {e.strerror or e}")
    try:
        info = imageinfo.probe(data[: imageinfo.HEAD_BYTES], len(data))
        imageinfo.check_size(info, max_pixels)
    except ImageError as e:
        return ErrorRecord(ref, e.kind, str(e))
    message = _decode_error(data) or "the image could not be decoded"
    return ErrorRecord(ref, "corrupt", f"{info.format.upper()}: {message}", info.width, info.height)


def _read_for_diagnosis(uri: str) -> bytes:
    if storage.is_s3(uri):
        try:
            return storage.read_bytes(uri)
        except FileNotFoundError:
            raise
        except OSError as e:  # still failing after the retries: S3 is down, not this image
            raise storage.S3Unavailable(f"S3 unreachable: cannot read {uri} after "
                                        f"{storage.current().max_attempts} attempts: {e}") from e
    with open(uri, "rb") as f:
        return f.read()


def _decode_error(data: bytes) -> str | None:
    import tensorflow as tf

    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.OpError, ValueError) as e:
        return getattr(e, "message", str(e)).strip().splitlines()[0]
    return None
