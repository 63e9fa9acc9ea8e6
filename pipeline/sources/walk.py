"""A directory INPUT: a sorted depth-first walk, and the stat of a local file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from ..inputs import LocalInput, absolute_path
from ..types import NULL_INT, ImageRef, printable
from .chunks import SourceStats
from .ids import is_hidden, is_image_name, path_id

__all__ = ["absolute_path", "local_ref", "stat_values", "walk_directory"]


def local_ref(image_id: str, path: Path) -> ImageRef:
    """`image_id` as given (a path's id comes from `path_id`). The reader opens only regular
    files (or symlinks to them): reading a FIFO blocks forever and /dev/zero never ends, so
    anything else gets file_size None and an error row."""
    image_id = printable(image_id)  # already valid UTF-8 unless a caller passed a raw name
    return LocalInput(absolute_path(os.fspath(path))).stat().ref(image_id)


def walk_directory(root: Path, stats: SourceStats) -> Iterator[ImageRef]:
    """Depth-first, sorted, following directory symlinks once (loops are skipped)."""
    root_abs = Path(absolute_path(os.fspath(root)))
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
    _, size, mtime = LocalInput(path).stat()
    return NULL_INT if size is None else size, NULL_INT if mtime is None else mtime
