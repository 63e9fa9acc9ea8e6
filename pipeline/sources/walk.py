"""A directory INPUT: a sorted depth-first walk, and the stat of a local file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

from ..inputs import LocalInput, absolute_path
from ..types import NULL_INT, ImageRef, printable
from .chunks import RefChunk, SourceStats, growing_chunks
from .ids import is_hidden, is_image_name, path_id

__all__ = ["absolute_path", "local_ref", "stat_values", "walk_chunks"]


def local_ref(image_id: str, path: Path) -> ImageRef:
    """`image_id` as given (a path's id comes from `path_id`). The reader opens only regular
    files (or symlinks to them): reading a FIFO blocks forever and /dev/zero never ends, so
    anything else gets file_size None and an error row."""
    image_id = printable(image_id)  # already valid UTF-8 unless a caller passed a raw name
    return LocalInput(absolute_path(os.fspath(path))).stat().ref(image_id)


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
    _, size, mtime = LocalInput(path).stat()
    return NULL_INT if size is None else size, NULL_INT if mtime is None else mtime
