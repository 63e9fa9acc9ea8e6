"""The one way a local file is written so that a crash never leaves half of it under its name.

Write to a temp name in the same directory, fsync it, rename it over the final name, fsync the
directory. The temp file is removed on any error (an interrupt included). Temp names start with
TMP_PREFIX and never end in .parquet, so no reader of OUTPUT ever sees one, and a run's recovery
can delete the ones a killed process left. (S3 needs none of this: an object appears only when
its single PUT completed; see writer.)
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from typing import BinaryIO, Callable, Iterator

log = logging.getLogger(__name__)

TMP_PREFIX = "_tmp-"
_TEMP_PID = re.compile(re.escape(TMP_PREFIX) + r".+-(\d+)(\.[\w.]+)?")  # see temp_path
STALE_TEMP_SECONDS = 24 * 3600  # a temp file this old is stale whatever its pid (another host's)


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
        _rename(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(final) or ".")


def _rename(tmp: str, final: str) -> None:
    """os.replace; its error names `final` (the temp name would only puzzle the reader)."""
    try:
        os.replace(tmp, final)
    except OSError as e:
        raise type(e)(e.errno, e.strerror, final) from None


def write_file(final: str, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(f)` on a binary file object; its bytes become `final` atomically."""
    with replacing(final) as tmp:
        try:
            f = open(tmp, "wb")
        except OSError as e:  # a missing or read-only directory: say which file was meant
            raise type(e)(e.errno, e.strerror, final) from None
        with f:
            write(f)


def write_bytes(final: str, data: bytes) -> None:
    write_file(final, lambda f: f.write(data))


def write_cache(final: str, write: Callable[[str], object], suffix: str = ".tmp") -> bool:
    """Write a cache file (`write(tmp)` fills a temp path) atomically, first deleting the temp
    files that killed writers left in its directory. A cache that cannot be written (read-only,
    full, a --cache-dir that is a file) only costs the work again: False, with a warning."""
    directory = os.path.dirname(final)
    try:
        os.makedirs(directory, exist_ok=True)
        remove_stale_temps(directory)
        with replacing(final, suffix) as tmp:
            write(tmp)
        return True
    except OSError as e:
        log.warning(f"cannot cache {final} ({e.strerror or e}); the next run does this work "
                    f"again")
        return False


def remove_stale_temps(directory: str) -> int:
    """Delete the temp files in `directory` whose writer is gone (its pid no longer runs here, or
    the file is a day old); for a directory no lock guards (a cache). Returns how many."""
    removed, now = 0, time.time()
    for name in os.listdir(directory):
        match = _TEMP_PID.fullmatch(name)
        if not match:
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if now - os.stat(path).st_mtime > STALE_TEMP_SECONDS or not _running(int(match[1])):
                os.unlink(path)
                removed += 1
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        pass
    return True


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable."""
    _fsync(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
