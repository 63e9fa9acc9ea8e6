"""Which ids a stream has already produced, in 16 bytes of memory per id (no Python object each).

A manifest may name an image twice; its stream must yield one ref per id, and it may be far
too long for a Python set of its ids. `SeenIds` keeps a 64-bit hash and a file offset per id in
sorted numpy runs (merged like a binary counter, so a lookup searches O(log n) runs), and the
ids themselves in an unlinked temporary file. A hash only finds candidates: an id counts as seen
only when the bytes stored for a candidate equal it, so a hash collision never merges two
distinct ids (see tests/test_sources.py, which forces collisions with a tiny hash).
"""
from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from typing import Callable, Sequence

import numpy as np

Hasher = Callable[[bytes], int]
MASK = 0xFFFF_FFFF_FFFF_FFFF


def blake2b_64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


id_hash: Hasher = blake2b_64  # tests put a tiny hash here to force collisions


def _encode(image_id: str) -> bytes:
    return image_id.encode("utf-8", "surrogateescape")


class SeenIds:
    """`first_seen(ids)` -> a bool per id: True the first time an id appears (in this call or
    any earlier one), False for every repeat."""

    def __init__(self, hasher: Hasher | None = None):
        self._hash = hasher or id_hash
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, offsets)
        self._file = tempfile.TemporaryFile(prefix="pipeline-ids-")
        self._end = 0

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return sum(len(h) for h, _ in self._runs)

    def first_seen(self, ids: Sequence[str]) -> np.ndarray:
        first: dict[bytes, int] = {}  # each distinct id of this call -> its first index
        for i, image_id in enumerate(ids):
            first.setdefault(_encode(image_id), i)
        raws = list(first)
        hashes = np.fromiter((self._hash(r) & MASK for r in raws), np.uint64, len(raws))
        stored = self._stored(raws, hashes)
        new = np.zeros(len(ids), bool)
        new[np.fromiter(first.values(), np.int64, len(raws))[~stored]] = True
        if (~stored).any():
            keep = np.flatnonzero(~stored)
            self._add([raws[j] for j in keep], hashes[keep])
        return new

    def _stored(self, raws: list[bytes], hashes: np.ndarray) -> np.ndarray:
        """Per id: is it already stored? Hashes are compared vectorized per run; only an equal
        hash (a repeat, or rarely a collision) reads the stored bytes to decide."""
        stored = np.zeros(len(raws), bool)
        for run_hashes, offsets in self._runs:
            lo = np.searchsorted(run_hashes, hashes, "left")
            hi = np.searchsorted(run_hashes, hashes, "right")
            for j in np.flatnonzero((hi > lo) & ~stored):
                stored[j] = any(self._read(int(o)) == raws[j] for o in offsets[lo[j]:hi[j]])
        return stored

    def _add(self, raws: list[bytes], hashes: np.ndarray) -> None:
        records = [struct.pack("<I", len(raw)) + raw for raw in raws]
        sizes = np.fromiter((len(r) for r in records), np.uint64, len(records))
        offsets = np.full(len(records), self._end, np.uint64)
        offsets[1:] += np.cumsum(sizes)[:-1]
        data = b"".join(records)
        os.pwrite(self._file.fileno(), data, self._end)
        self._end += len(data)
        order = np.argsort(hashes, kind="stable")
        run = (hashes[order], offsets[order])
        while self._runs and len(self._runs[-1][0]) <= len(run[0]):  # keep runs of rising size
            older = self._runs.pop()
            run = _merge(older, run)
        self._runs.append(run)

    def _read(self, offset: int) -> bytes:
        fd = self._file.fileno()
        (length,) = struct.unpack("<I", os.pread(fd, 4, offset))
        return os.pread(fd, length, offset + 4)


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]):
    """Two sorted runs -> one, without a sort: each of b's entries goes after a's equal ones."""
    at = np.searchsorted(a[0], b[0], "right") + np.arange(len(b[0]))
    from_a = np.ones(len(a[0]) + len(b[0]), bool)
    from_a[at] = False
    del at
    merged = []
    for x, y in zip(a, b):
        out = np.empty(len(from_a), x.dtype)
        out[from_a], out[~from_a] = x, y
        merged.append(out)
    return merged[0], merged[1]
