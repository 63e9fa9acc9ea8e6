"""A directory INPUT: a sorted depth-first walk, and the stat of a local file."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Callable, Iterator

from ..types import NULL_INT, ImageRef, mtime_ns_or_none, printable
from .chunks import RefChunk, SourceStats, growing_chunks
from .ids import is_hidden, is_image_name, path_id

log = logging.getLogger(__name__)


def local_ref(image_id: str, path: Path) -> ImageRef:
    """`image_id` as given (a path's id comes from `path_id`). The reader opens only regular
    files (or symlinks to them): reading a FIFO blocks forever and /dev/zero never ends, so
    anything else gets file_size None and an error row."""
    image_id = printable(image_id)  # already valid UTF-8 unless a caller passed a raw name
    resolved = absolute_path(os.fspath(path))
    try:
        st = os.stat(resolved)
    except (OSError, ValueError):  # ValueError: a NUL byte (callers refuse it before)
        return ImageRef(image_id, resolved, None, None)
    size = st.st_size if stat.S_ISREG(st.st_mode) else None
    return ImageRef(image_id, resolved, size, _mtime_ns(st, resolved))


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


def walk_chunks(root: Path, stats: SourceStats, stop: Callable[[], bool] = lambda: False
                ) -> Iterator[RefChunk]:
    """A directory INPUT's images: depth-first, sorted, following directory symlinks once
    (loops are skipped), in chunks of 1, 2, 4, ... 1024 images as columns: the refs are made
    only for the rows asked for. `stop()` is asked between two images."""
    for rows in growing_chunks(_walk_rows(root, stats), stop):
        ids, paths, size, mtime_ns = zip(*rows)
        yield RefChunk.of_columns(ids, paths, size, mtime_ns)


def _walk_rows(root: Path, stats: SourceStats) -> Iterator[tuple[str, str, int, int]]:
    """(image_id, path, size, mtime_ns) of each image, as local_ref would make its ref (the
    walk's paths are absolute and normalized already)."""
    visited: set[tuple[int, int]] = set()

    def walk(directory: str, rel: str) -> Iterator[tuple[str, str, int, int]]:
        try:
            st = os.stat(directory)
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        if key in visited:
            stats.loops += 1
            return
        visited.add(key)
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            name = entry.name
            if is_hidden(name):
                stats.ignored += 1
            elif _is_dir(entry):
                yield from walk(entry.path, f"{rel}{name}/")
            elif is_image_name(name):
                yield (path_id(rel + name), entry.path, *stat_values(entry.path))
            else:
                stats.ignored += 1

    yield from walk(os.fspath(Path(absolute_path(os.fspath(root)))), "")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def stat_values(path: str) -> tuple[int, int]:
    """(size, mtime_ns) as local_ref finds them, NULL_INT for None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return NULL_INT, NULL_INT
    mtime = _mtime_ns(st, path)
    return (st.st_size if stat.S_ISREG(st.st_mode) else NULL_INT), \
        NULL_INT if mtime is None else mtime
