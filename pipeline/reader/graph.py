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
from .decode import chunk_bytes_and_plans, labeling_image, unpacked
from .diagnosis import diagnose_safely, printable_ref


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

    def _generate(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(seqs, paths) of the inputs worth reading, a chunk at a time (read in one Python
        call each): up to CHUNK_INPUTS inputs and CHUNK_BYTES of files (a larger file alone)."""
        seqs: list[int] = []
        paths: list[bytes] = []
        size = 0
        try:
            for seq, ref in enumerate(self._refs):
                with self._lock:
                    self._pending.append((seq, ref))
                if not _worth_reading(ref, self._max_file_bytes):
                    continue
                file_size = ref.file_size or 0  # known: _worth_reading
                if seqs and size + file_size > CHUNK_BYTES:
                    yield np.array(seqs, np.int64), np.array(paths, object)
                    seqs, paths, size = [], [], 0
                seqs.append(seq)
                paths.append(os.fsencode(ref.uri))
                size += file_size
                if len(seqs) == CHUNK_INPUTS:
                    yield np.array(seqs, np.int64), np.array(paths, object)
                    seqs, paths, size = [], [], 0
        except Exception as e:  # tf.data would end the stream quietly; re-raised in __iter__
            self._source_error = e
        if seqs:
            yield np.array(seqs, np.int64), np.array(paths, object)

    def __iter__(self) -> Iterator[Batch]:
        import tensorflow as tf

        chunks = tf.data.Dataset.from_generator(
            self._generate,
            output_signature=(tf.TensorSpec((None,), tf.int64), tf.TensorSpec((None,), tf.string)),
        )
        dataset = make_dataset(chunks, self._pre, self._batch_size, self._max_pixels,
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


# Batches decoded ahead of the model.
PREFETCH_BATCHES = 2
# A chunk of inputs: handed from the Python generator to tf.data and read, hashed, checked and
# planned in one Python call (a call costs ~0.15 ms, more than that work for a small JPEG).
CHUNK_INPUTS = 64
CHUNK_BYTES = 64 * 2**20  # the files' sizes; a larger file makes a chunk alone
# Chunks read at once: the read of one overlaps the decode of the one before. At most
# (READ_CHUNKS + the decode's) x max(CHUNK_BYTES, max_file_bytes) of file bytes in memory.
READ_CHUNKS = 2


def make_dataset(chunks, pre: Preprocess, batch_size: int, max_pixels: int,
                 max_file_bytes: int = ReadLimits.max_file_bytes, s3: S3Options = S3Options(),
                 feed: str = "float32", scaled_decode: bool = ReadLimits.scaled_decode):
    """Dataset of chunks (seqs [n], paths [n]) -> batches of (seq, image, width, height,
    sha256); failures are dropped. `feed`: the images' dtype, float32 model input or uint8
    pixels (see image_from_bytes). sha256: the 32-byte digest of the bytes decoded, hashed as
    they were read (no second read), as uint8 so the batch can go to a device whole.

    Fixed parallelism instead of AUTOTUNE: beside a model that uses every core, tf.data's
    autotuner settled run by run on very different parallelism (end to end 112 or 150 images/s
    on the same 2-core host); a thread per core with single-threaded ops is steady at the top.
    """
    import tensorflow as tf

    # No AutoGraph: the graph is written with tf.cond/switch_case already, and converting the
    # Python source took 0.6 s of every run's start-up.
    @tf.autograph.experimental.do_not_convert
    def read(seqs, paths):  # also hashes, checks and plans: the bytes cross into Python once
        return chunk_bytes_and_plans(seqs, paths, pre, max_pixels, max_file_bytes, s3,
                                     scaled_decode)

    @tf.autograph.experimental.do_not_convert
    def decode(seq, data, sha, plan, box):
        plan = unpacked(plan)
        image = labeling_image(data, plan, box, pre, max_pixels, scaled_decode, feed)
        return seq, image, plan.width, plan.height, sha

    return (
        chunks.map(read, num_parallel_calls=READ_CHUNKS)
        .unbatch()
        .map(decode, num_parallel_calls=devices.cpu_threads())
        .ignore_errors()
        .batch(batch_size)
        .prefetch(PREFETCH_BATCHES)
        .with_options(dataset_options())
    )


def dataset_options():
    """The reader's tf.data options: in order, fixed parallelism, no graph rewrites."""
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True  # failures are found by the gaps in the sequence
    options.autotune.enabled = False
    options.threading.max_intra_op_parallelism = 1  # parallel across images, not inside one
    options.experimental_optimization.apply_default_optimizations = False  # ~0.1 s at start-up
    return options
