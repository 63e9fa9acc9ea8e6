"""Bounded reads of one input in the graph (local or S3 through pipeline/inputs.py): never more
than --max-file-bytes, never a FIFO or a device, and the sha256 of exactly the bytes read."""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os

import numpy as np

from .. import inputs
from ..imageinfo import ImageError
from ..inputs import mib
from ..types import ReadLimits, S3Options


def bytes_tensor(path, max_file_bytes: int = ReadLimits.max_file_bytes, s3: S3Options = S3Options()):
    """A local path or an s3:// URI (string tensor) -> the file's bytes as a string tensor (a
    graph op; read_capped is the plain-Python read, through inputs.open_input); fails
    (the element is dropped, then diagnosed) for what is not a regular file or holds more than
    max_file_bytes.

    Not tf.io.read_file: it opens by name, blocking (a FIFO put in the file's place after the
    listing hangs it forever) and reads whatever is there (a link to /dev/zero never ends).
    A Python read through numpy_function still runs in parallel: os.read releases the GIL.
    """
    import tensorflow as tf

    def read(uri: bytes) -> bytes:
        return read_capped(as_bytes(uri), max_file_bytes, s3)

    data = tf.numpy_function(read, [path], tf.string, stateful=False)
    data.set_shape([])
    return data


# S3 objects read at once per chunk of inputs: a GET waits on S3 (tens of ms), not on a core.
S3_READ_THREADS = 8


@functools.lru_cache(maxsize=1)
def s3_read_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads S3 reads run on (one pool for the process, started on the first S3 read)."""
    return concurrent.futures.ThreadPoolExecutor(S3_READ_THREADS, thread_name_prefix="s3-read")


def as_bytes(value) -> bytes:
    """A string tensor's value inside numpy_function: bytes when traced, a 0-d object array
    when run eagerly (where bytes() would give the object's address)."""
    return value if isinstance(value, bytes) else np.asarray(value).item()


def sha256_digest(data: bytes) -> np.ndarray:
    """The sha256 of a file's bytes as uint8 [32] (so a batch of them can go to a device whole;
    hashlib releases the GIL on large buffers)."""
    return np.frombuffer(hashlib.sha256(data).digest(), np.uint8)


def sha256_hex(data: bytes) -> str:
    """content_sha256 of a file's bytes."""
    return hashlib.sha256(data).hexdigest()


def read_capped(uri: bytes, limit: int, s3: S3Options) -> bytes:
    """The bytes of a local file or an S3 object, ImageError if it holds more than `limit`."""
    data = inputs.open_input(os.fsdecode(uri), s3).read(limit + 1)  # S3: a ranged GET
    if len(data) > limit:
        raise ImageError("too_large", f"the file grew above --max-file-bytes {mib(limit)}")
    return data
