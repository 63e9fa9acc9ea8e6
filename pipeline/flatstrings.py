"""Strings as one flat byte buffer plus offsets: hashed and compared a whole column at a time,
with no Python object per string (the done set, and the manifest's set of seen ids)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa


class FlatStrings:
    """Strings as one uint8 buffer (8 zero bytes of padding at the end) and int64 offsets."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets.astype(np.int64))

    def lengths_of(self, i: np.ndarray) -> np.ndarray:
        """The lengths of strings `i` (without computing every length)."""
        return self.offsets[i + 1].astype(np.int64) - self.offsets[i].astype(np.int64)

    @classmethod
    def of(cls, strings: Sequence[str]) -> "FlatStrings":
        return cls.of_arrow(pa.array(strings, pa.string()))

    @classmethod
    def of_arrow(cls, arr: pa.Array) -> "FlatStrings":
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if arr.null_count:
            raise ValueError("a null where a string is required (image_id)")
        offsets, data = flat_buffers(arr)
        first, last = int(offsets[0]), int(offsets[-1])
        padded = np.zeros(last - first + 8, np.uint8)
        padded[:last - first] = data[first:last]
        return cls(padded, offsets - first)

    def bytes_of(self, i: int) -> bytes:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def words(self) -> np.ndarray:
        """Every 8-byte little-endian word starting at each byte position (a strided view)."""
        return np.ndarray((len(self.data) - 7,), "<u8", buffer=self.data, strides=(1,))


def flat_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets of the array's rows, the data buffer) of a string/binary array."""
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    if not (large or pa.types.is_string(arr.type) or pa.types.is_binary(arr.type)):
        arr = arr.cast(pa.large_string())
        large = True
    bufs = arr.buffers()
    dtype = np.int64 if large else np.int32
    offsets = np.frombuffer(bufs[1], dtype, count=len(arr) + 1,
                            offset=arr.offset * np.dtype(dtype).itemsize).astype(np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets, data


_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer."""
    x ^= x >> np.uint64(30)
    x *= _M2
    x ^= x >> np.uint64(27)
    x *= _M3
    x ^= x >> np.uint64(31)
    return x


def hash64(strings: FlatStrings) -> np.ndarray:
    """A 64-bit hash of each string, 8 bytes per vectorized step. (The done index stores keys
    made of it: changing its values makes every saved index miss.)"""
    starts, lengths = strings.offsets[:-1], strings.lengths
    words = strings.words()
    shortest = int(lengths.min(initial=0))
    with np.errstate(over="ignore"):
        h = _mix(lengths.astype(np.uint64) * _M1 + _M1)
        for w in range(0, int(lengths.max(initial=0)), 8):
            if w + 8 <= shortest:  # a whole word of every string: no mask, no subset
                h += words[starts + w]
                h *= _M1
                _mix(h)
                continue
            if w < shortest or 4 * int((lengths > w).sum()) >= len(h):  # most still go on
                going = lengths > w
                word = words[np.minimum(starts + w, len(words) - 1)] & _mask(lengths - w)
                mixed = _mix((h + word) * _M1)
                h = mixed if w < shortest else np.where(going, mixed, h)
                continue
            active = np.flatnonzero(lengths > w)
            word = words[starts[active] + w] & _mask(lengths[active] - w)
            h[active] = _mix((h[active] + word) * _M1)
    return h


# _MASKS[k]: the low k bytes (all 8 from k = 8 on)
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)


def _mask(remaining: np.ndarray) -> np.ndarray:
    """All ones for >= 8 bytes left; else the low `remaining` bytes (none for <= 0)."""
    return _MASKS[np.clip(remaining, 0, 8)]


def equal(a: FlatStrings, ai: np.ndarray, b: FlatStrings, bi: np.ndarray) -> np.ndarray:
    """a[ai[j]] == b[bi[j]] for each j, exactly, byte for byte. Every pair is compared a word
    at a time (no subset per word: nearly all pairs are equal where this is used); a word past
    a string's end is masked out, and a read past the buffer is clamped to its last word."""
    la, lb = a.lengths_of(ai), b.lengths_of(bi)
    same = la == lb
    if len(ai) == 0:
        return same
    sa, sb = a.offsets[ai].astype(np.int64), b.offsets[bi].astype(np.int64)
    wa, wb = a.words(), b.words()
    shortest = int(la.min())
    for w in range(0, int(la.max()), 8):
        left = wa[np.minimum(sa + w, len(wa) - 1)]
        right = wb[np.minimum(sb + w, len(wb) - 1)]
        if w + 8 <= shortest:  # whole words
            same &= left == right
        else:
            same &= ((left ^ right) & _mask(la - w)) == 0
    return same


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated arange(start, start + length) for each pair: the byte positions of strings."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    shift = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total, dtype=np.int64) + shift
