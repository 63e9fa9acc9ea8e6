"""The one way a local file is written so that a crash never leaves half of it under its name.

Write to a temp name in the same directory, fsync it, rename it over the final name, fsync the
directory. The temp file is removed on any error (an interrupt included). Temp names start with
TMP_PREFIX and never end in .parquet, so no reader of OUTPUT ever sees one, and a run's recovery
can delete the ones a killed process left. (S3 needs none of this: an object appears only when
its single PUT completed; see writer.)
"""
from __future__ import annotations

import contextlib
import os
from typing import BinaryIO, Callable, Iterator

TMP_PREFIX = "_tmp-"


def temp_path(final: str, suffix: str = ".tmp") -> str:
    """`_tmp-<name>-<pid><suffix>` beside `final`. `suffix` is for writers that insist on one
    (Keras: ".keras", ".weights.h5"); the pid keeps two processes sharing a cache apart."""
    directory, name = os.path.split(final)
    if suffix.endswith(".parquet"):
        raise ValueError("a temp file must not look like a part to readers of OUTPUT")
    return os.path.join(directory, f"{TMP_PREFIX}{name}-{os.getpid()}{suffix}")


@contextlib.contextmanager
def replacing(final: str, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temp path to write `final`'s content to (for writers that want a file name);
    when the block ends cleanly it is fsynced and renamed to `final`, else removed."""
    tmp = temp_path(final, suffix)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(final) or ".")


def write_file(final: str, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(f)` on a binary file object; its bytes become `final` atomically."""
    with replacing(final) as tmp:
        with open(tmp, "wb") as f:
            write(f)


def write_bytes(final: str, data: bytes) -> None:
    write_file(final, lambda f: f.write(data))


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable."""
    _fsync(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
