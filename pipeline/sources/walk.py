"""A directory INPUT: a sorted depth-first walk, and the stat of a local file."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

from ..types import NULL_INT, ImageRef
from .chunks import SourceStats
from .ids import is_hidden, is_image_name, path_id, printable



def local_ref(image_id: str, path: Path) -> ImageRef:
    """`image_id` as given (a path's id comes from `path_id`). The reader opens only regular
    files (or symlinks to them): reading a FIFO blocks forever and /dev/zero never ends, so
    anything else gets file_size None and an error row."""
    image_id = printable(image_id)  # already valid UTF-8 unless a caller passed a raw name
    try:
        st = path.stat()
    except (OSError, ValueError):  # ValueError: a NUL byte (callers refuse it before)
        return ImageRef(image_id, os.path.abspath(path), None, None)
    size = st.st_size if stat.S_ISREG(st.st_mode) else None
    return ImageRef(image_id, os.path.abspath(path), size, st.st_mtime_ns)


def walk_directory(root: Path, stats: SourceStats) -> Iterator[ImageRef]:
    """Depth-first, sorted, following directory symlinks once (loops are skipped)."""
    root_abs = Path(os.path.abspath(root))
    visited: set[tuple[int, int]] = set()

    def walk(directory: Path) -> Iterator[ImageRef]:
        try:
            st = directory.stat()
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
            path = Path(entry.path)
            if is_hidden(entry.name):
                stats.ignored += 1
            elif _is_dir(entry):
                yield from walk(path)
            elif is_image_name(entry.name):
                yield local_ref(path_id(path.relative_to(root_abs).as_posix()), path)
            else:
                stats.ignored += 1

    yield from walk(root_abs)


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
    return (st.st_size if stat.S_ISREG(st.st_mode) else NULL_INT), st.st_mtime_ns
