"""Bounded reads of one input, local or S3: never more than --max-file-bytes, never a FIFO or
a device, and the sha256 of exactly the bytes read."""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os
import stat

import numpy as np

from .. import storage
from ..imageinfo import ImageError
from ..types import ImageRef, ReadLimits, S3Options, printable


def bytes_tensor(path, max_file_bytes: int = ReadLimits.max_file_bytes, s3: S3Options = S3Options()):
    """A local path or an s3:// URI (string tensor) -> the file's bytes as a string tensor (a
    graph op; read_capped is the plain-Python read, storage.read_bytes an S3 object's); fails
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


_FILE_TYPES = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def _not_a_directory(e: OSError) -> str:
    """ENOTDIR: a directory in the path is a file (`photo.jpg/x.jpg`); it is as missing as
    ENOENT, and just as permanent while the tree stays so."""
    return " (a directory in its path is a file)" if isinstance(e, NotADirectoryError) else ""


def read_file_explained(path: str, max_file_bytes: int) -> bytes:
    """read_regular_file, with a plainer reason from a stat by name first (for diagnosis)."""
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


def read_s3_object_explained(ref: ImageRef, max_file_bytes: int, s3: S3Options) -> bytes:
    """The object's bytes, or why not (for diagnosis): empty, too large, not found; S3 down
    raises S3Unavailable (not this image's fault)."""
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
