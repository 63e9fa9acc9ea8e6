"""Sorted uint64 keys searched many at a time: a directory of the keys' top bits bounds each
query to a small bucket, then vectorized halving steps find its place (the done set's lookup,
doneset.DoneSet)."""
from __future__ import annotations

import numpy as np

SLICE = 1 << 20  # keys counted per pass while the directory is made


class SortedKeys:
    """`first_at_least(base)` = np.searchsorted(keys, base, "left") for sorted uint64 `keys`
    whose values use their low `used_bits` bits; the directory is made on the first search."""

    def __init__(self, keys: np.ndarray, used_bits: int):
        self._keys, self._used_bits = keys, used_bits
        self._starts: np.ndarray | None = None
        self._shift = 0

    def first_at_least(self, base: np.ndarray) -> np.ndarray:
        """The bucket of the key range that `base` falls in bounds the search, then a few
        vectorized halving steps, each one gather: a couple of cache misses per query where a
        binary search of the whole keys array misses about once per level below the cache
        (the keys are hundreds of MB at 50M)."""
        directory, shift = self._directory()
        bucket = (base >> np.uint64(shift)).astype(np.int64) if shift < 64 \
            else np.zeros(len(base), np.int64)  # one bucket (a shift by 64 is undefined)
        lo, hi = directory[bucket].astype(np.int64), directory[bucket + 1].astype(np.int64)
        last = len(self._keys) - 1
        while True:
            going = lo < hi
            if not going.any():
                return lo
            mid = (lo + hi) >> 1
            below = self._keys[np.minimum(mid, last)] < base
            lo = np.where(going & below, mid + 1, lo)
            hi = np.where(going & ~below, mid, hi)

    def _directory(self) -> tuple[np.ndarray, int]:
        """(where each bucket of keys starts, plus the end; the shift that makes a key its
        bucket): buckets of the top bits of the key range, about 4-8 keys each (0.5-1 byte per
        key), counted a slice of the keys at a time."""
        if self._starts is None:
            n, used = len(self._keys), self._used_bits
            bits = max(0, min(used, int(n).bit_length() - 3))
            shift = used - bits
            counts = np.zeros(1 << bits, np.int64)
            if bits:
                for start in range(0, n, SLICE):
                    top = self._keys[start:start + SLICE] >> np.uint64(shift)
                    counts += np.bincount(top.astype(np.int64), minlength=1 << bits)
            else:
                counts[0] = n
            starts = np.zeros((1 << bits) + 1, np.uint32 if n < 2**32 else np.int64)
            starts[1:] = np.cumsum(counts)
            self._starts, self._shift = starts, shift
        return self._starts, self._shift
