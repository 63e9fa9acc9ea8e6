"""One input, a local path or an s3:// URI, behind one interface: its stat and its bytes (the
input side's counterpart of the output store, pipeline/store/). The choice between local and S3
is made here, once per input; nobody else asks whether an input is on S3 to read or stat it.

    src = inputs.open_input(uri, s3)   # LocalInput or S3Input
    src.stat()                         # Stat(uri, size, mtime_ns): (None, None) if not found
    src.read(limit)                    # at most `limit` bytes; ImageError not_found / unreadable
    inputs.stat_many(uris, s3)         # the S3 ones in one request list (one round trip each
                                       # is slow): callers pass chunks of sources.S3_STAT_CHUNK

A local input is read only if it is a regular file (a FIFO or device swapped in after the
listing would hang the read or never end), and its path is used as given: the listing resolves
it once (`resolve`), so the stat, the read and the uri name one file. An S3 key with an empty
segment (`a//b.jpg`), which pyarrow cannot address, is stat'ed and read by its raw key through
boto3; S3 failures are OSErrors (storage.S3Error, pyarrow's).
"""
from __future__ import annotations

import logging
import os
import stat
import sys
from typing import Iterable, NamedTuple

from . import storage
from .imageinfo import ImageError
from .types import ImageRef, S3Options, mtime_ns_or_none, printable

log = logging.getLogger(__name__)


class Stat(NamedTuple):
    uri: str  # what was stat'ed
    size: int | None  # None: not found, or not a regular file
    mtime_ns: int | None  # None: not found, or outside what the mtime column holds

    def ref(self, image_id: str) -> ImageRef:
        return ImageRef(image_id, self.uri, self.size, self.mtime_ns)


def open_input(uri: str, s3: S3Options = S3Options()) -> LocalInput | S3Input:
    """The input at `uri` (a local path as resolved by `resolve`, or an s3:// URI)."""
    return _kind(uri)(uri, s3)


def resolve(path: str, base: str = "") -> str:
    """How a listing names an input: a local path absolute (relative to `base`, see
    absolute_path), an s3:// URI as it is."""
    return _kind(path).resolve(path, base)


def is_remote(uri: str) -> bool:
    """True if a stat of `uri` is a round trip (S3): stat such inputs together (stat_many)."""
    return _kind(uri).remote


def stat_many(uris: Iterable[str], s3: S3Options = S3Options()) -> list[Stat]:
    """The Stat of each uri, in order: the S3 ones in one request list."""
    sources = [open_input(uri, s3) for uri in uris]
    on_s3 = iter(S3Input.stat_all([src for src in sources if isinstance(src, S3Input)], s3))
    return [next(on_s3) if isinstance(src, S3Input) else src.stat() for src in sources]


def _kind(uri: str) -> type[LocalInput] | type[S3Input]:
    return S3Input if storage.is_s3(uri) else LocalInput


class LocalInput:
    remote = False  # a stat is a system call

    def __init__(self, path: str, s3: S3Options = S3Options()):
        self.uri = path

    @staticmethod
    def resolve(path: str, base: str = "") -> str:
        return absolute_path(os.path.join(base, path))

    def stat(self) -> Stat:
        """Size None for what is not a regular file (the reader will not open it)."""
        try:
            st = os.stat(self.uri)
        except (OSError, ValueError):  # ValueError: a NUL byte (listings refuse it before)
            return Stat(self.uri, None, None)
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        return Stat(self.uri, size, _mtime_ns(st, self.uri))

    def read(self, limit: int | None = None) -> bytes:
        return read_regular_file(self.uri, sys.maxsize if limit is None else limit)

    def read_explained(self, max_file_bytes: int, listed_size: int | None = None) -> bytes:
        """`read`, with a plainer reason from a stat by name first (for diagnosis): a broken
        symlink, not a regular file, empty, too large."""
        path = self.uri
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
            raise ImageError("too_large", f"the file is {mib(st.st_size)}, above "
                             f"--max-file-bytes {mib(max_file_bytes)}; it is not read")
        data = self.read(max_file_bytes + 1)  # the stat above only names the problem
        if len(data) > max_file_bytes:
            raise ImageError("too_large",
                             f"the file grew above --max-file-bytes {mib(max_file_bytes)}")
        return data


class S3Input:
    remote = True  # a stat is a round trip: stat_many batches them

    def __init__(self, uri: str, s3: S3Options = S3Options()):
        self.uri, self.s3 = uri, s3

    @staticmethod
    def resolve(uri: str, base: str = "") -> str:
        return uri

    def stat(self) -> Stat:
        return self.stat_all([self], self.s3)[0]

    @staticmethod
    def stat_all(sources: list[S3Input], s3: S3Options) -> list[Stat]:
        """One get_file_info request list for the keys pyarrow addresses; a HEAD by raw key
        for the others."""
        from pyarrow import fs

        plain = [src for src in sources if storage.pyarrow_can_address(src.uri)]
        infos = iter(storage.filesystem(s3).get_file_info([storage.fs_path(src.uri)
                                                           for src in plain]) if plain else ())
        stats = []
        for src in sources:
            if not storage.pyarrow_can_address(src.uri):
                stats.append(Stat(src.uri, *(storage.head_raw_key(src.uri, s3) or (None, None))))
                continue
            info = next(infos)
            uri = storage.S3_SCHEME + info.path
            stats.append(Stat(uri, info.size, info.mtime_ns) if info.type == fs.FileType.File
                         else Stat(uri, None, None))
        return stats

    def read(self, limit: int | None = None) -> bytes:
        """At most `limit` bytes (a ranged GET: a huge or growing object costs no more)."""
        try:
            return storage.read_bytes(self.uri, self.s3, limit)
        except FileNotFoundError:
            raise ImageError("not_found", f"object not found: {self.uri}") from None

    def read_explained(self, max_file_bytes: int, listed_size: int | None = None) -> bytes:
        """The object's bytes, or why not (for diagnosis): empty or too large by the listed
        size, not found; S3 down raises S3Unavailable (not this image's fault)."""
        if listed_size == 0:
            raise ImageError("empty_file", "the object is empty (0 bytes)")
        if listed_size is not None and listed_size > max_file_bytes:
            raise ImageError("too_large", f"the object is {mib(listed_size)}, above "
                             f"--max-file-bytes {mib(max_file_bytes)}; it is not read")
        try:
            data = self.read(max_file_bytes + 1)
        except OSError as e:  # still failing after the retries: S3 is down, not this image
            raise storage.S3Unavailable(f"S3 unreachable: cannot read {self.uri} after "
                                        f"{self.s3.max_attempts} attempts: {e}") from e
        if len(data) > max_file_bytes:
            raise ImageError("too_large",
                             f"the object grew above --max-file-bytes {mib(max_file_bytes)}")
        return data


def absolute_path(path: str) -> str:
    """`path` made absolute the way the kernel resolves it, so that the stat, the read and the
    uri name one file: `link/..` is the parent of the link's target (os.path.abspath alone
    would drop it by its text, naming another file when `link` is a symlinked directory)."""
    path = os.path.join(os.getcwd(), path)
    if ".." not in path.split(os.sep):
        return os.path.normpath(path)
    head, tail = os.path.split(path)
    if tail in ("", ".", ".."):
        head, tail = path, ""
    try:
        os.stat(head)  # the kernel's walk; realpath's agrees once every step is a directory
    except (OSError, ValueError):  # missing, a file on the way, a NUL: kept as it is, so the
        return path  # stat and the read fail on it alike
    return os.path.join(os.path.realpath(head), tail) if tail else os.path.realpath(head)


def _mtime_ns(st: os.stat_result, path: str) -> int | None:
    """The file's mtime, or None (with a warning) if an mtime column cannot hold it."""
    mtime = mtime_ns_or_none(st.st_mtime_ns)
    if mtime is None:
        log.warning("%s: its mtime (%d s after 1970) is outside what the mtime column holds "
                    "(1677-09-21 to 2262-04-11); it is labeled with mtime null, so only a "
                    "change of its size relabels it", printable(path), st.st_mtime)
    return mtime


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


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
