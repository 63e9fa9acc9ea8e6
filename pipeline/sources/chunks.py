"""Listed images in chunks: SourceStats, RefChunk (columns, refs made on demand), and the
chunking of a stream of refs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from ..types import NULL_INT, ImageRef


@dataclass
class SourceStats:
    listed: int = 0
    ignored: int = 0  # non-image files, hidden files and hidden directories (not entered)
    duplicates: int = 0  # repeated manifest entries (one row each id)
    loops: int = 0  # directory symlink loops skipped


class KnownIds:
    """Where a run puts, once it has its done set, the lookup of the ids it already knows (per
    id of a string/binary array: its entry in the done set, exact, or -1). A manifest's
    de-duplication then remembers those ids in a byte each (idset.SeenIds.know), and its chunks
    carry the entries (RefChunk.found), so the done check does not look them up again."""

    def __init__(self) -> None:
        self.lookup: Callable[..., np.ndarray] | None = None


class RefChunk:
    """Listed images as columns (what the done set checks a whole chunk at a time): image_id,
    file_size and mtime in ns (types.NULL_INT where unknown); the ImageRefs are made only for
    the rows asked for."""

    def __init__(self, ids, size: np.ndarray, mtime_ns: np.ndarray,
                 make_refs: Callable[[np.ndarray], list[ImageRef]],
                 found: np.ndarray | None = None):
        self.ids, self.size, self.mtime_ns = ids, size, mtime_ns  # ids: pyarrow string array
        self.found = found  # KnownIds.lookup's answer per row, if the listing asked it
        self._make_refs = make_refs

    def __len__(self) -> int:
        return len(self.size)

    @classmethod
    def of_refs(cls, refs: list[ImageRef]) -> "RefChunk":
        import pyarrow as pa

        return cls(pa.array([r.image_id for r in refs], pa.string()),
                   np.array([NULL_INT if r.file_size is None else r.file_size for r in refs],
                            np.int64),
                   np.array([NULL_INT if r.mtime_ns is None else r.mtime_ns for r in refs],
                            np.int64),
                   lambda rows: [refs[i] for i in rows])

    @classmethod
    def of_columns(cls, ids: Sequence[str], uris: Sequence[str], size: Sequence[int],
                   mtime_ns: Sequence[int]) -> "RefChunk":
        """From Python columns (size and mtime NULL_INT where unknown): the refs are made only
        for the rows asked for."""
        import pyarrow as pa

        def make_refs(rows: np.ndarray) -> list[ImageRef]:
            return [ImageRef(ids[i], uris[i], None if size[i] == NULL_INT else size[i],
                             None if mtime_ns[i] == NULL_INT else mtime_ns[i])
                    for i in rows.tolist()]

        return cls(pa.array(ids, pa.string()), np.array(size, np.int64),
                   np.array(mtime_ns, np.int64), make_refs)

    def refs(self, rows: np.ndarray | None = None) -> list[ImageRef]:
        return self._make_refs(np.arange(len(self)) if rows is None else rows)

    def take(self, rows: np.ndarray) -> "RefChunk":
        import pyarrow as pa

        rows = np.asarray(rows, np.int64)
        return RefChunk(self.ids.take(pa.array(rows)), self.size[rows], self.mtime_ns[rows],
                        lambda r: self._make_refs(rows[r]),
                        None if self.found is None else self.found[rows])


T = TypeVar("T")


def growing_chunks(refs: Iterator[T], stop: Callable[[], bool],
                   largest: int = 1024) -> Iterator[list[T]]:
    chunk, size = [], 1
    for ref in refs:
        if stop():
            return
        chunk.append(ref)
        if len(chunk) >= size:
            yield chunk
            chunk, size = [], min(size * 2, largest)
    if chunk:
        yield chunk


def counted_chunks(chunks: Iterator[RefChunk], stats: SourceStats) -> Iterator[RefChunk]:
    for chunk in chunks:
        if len(chunk):
            stats.listed += len(chunk)
            yield chunk


def counted(refs: Iterator[ImageRef], stats: SourceStats) -> Iterator[ImageRef]:
    for ref in refs:
        stats.listed += 1
        yield ref
