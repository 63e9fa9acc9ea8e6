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
import os
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from .. import devices
from ..types import ErrorRecord, Feed, ImageRef, Preprocess, ReadLimits, S3Options
from .decode import image_from_bytes
from .diagnosis import diagnose_safely, printable_ref
from .reading import read_bytes_and_sha256


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
                refs.append(printable_ref(ref))
            else:
                errors.append(diagnose_safely(ref, self._max_pixels, self._max_file_bytes,
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


def _worth_reading(ref: ImageRef, max_file_bytes: int) -> bool:
    """Sources give file_size None for what is missing or not a regular file."""
    return ref.file_size is not None and 0 < ref.file_size <= max_file_bytes


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
