"""Which ids a stream has already produced, in 8 bytes of memory per id (no Python object each).

A manifest may name an image twice; its stream must yield one ref per id, and it may be far
too long for a Python set of its ids. `SeenIds` numbers the distinct ids in order of first
appearance and keeps, per id, one 64-bit key in sorted numpy runs: 32 bits of the id's hash
above its 32-bit number. The ids themselves (and where each ends) go to unlinked temporary
files, which are not resident memory. A hash only finds candidates: an id counts as seen only
when the bytes stored under a candidate's number equal it, so a hash collision never merges two
distinct ids (tests/test_listing.py forces collisions with a tiny hash). Runs merge like a
binary counter up to RUN_CAP keys, so merging never holds two copies of every key.

Once the listing's consumer knows a fixed set of distinct ids (a run's done set: most of a
nightly manifest), `SeenIds.know(lookup)` hands it a lookup giving each id's exact index in that
set (or -1): from then on an id the lookup finds is remembered as one byte at its index, with no
key, no stored bytes and no search of the runs; only the ids it does not find (the new images)
take the path above. An id is always found or always not (the set does not change), so each id
is remembered one way only; the ids stored before `know` are looked up once and marked too.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from .flatstrings import FlatStrings, hash64

Hasher = Callable[[bytes], int]
# per id of a string/binary array: its index in a fixed set of distinct ids (exact), or -1
Lookup = Callable[[pa.Array], np.ndarray]
MASK = 0xFFFF_FFFF_FFFF_FFFF
SEQ_BITS = 32
RUN_CAP = 1 << 21  # keys per run beyond which runs are no longer merged (16 MiB): a merge
# holds its two runs and their copy, so this bounds what a merge adds to the peak
_LOW = np.uint64((1 << SEQ_BITS) - 1)
_SHIFT = np.uint64(SEQ_BITS)


def blake2b_64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


id_hash: Hasher | None = None  # None: flatstrings.hash64, vectorized; tests put a tiny hash here


def _encode(image_id: str) -> bytes:
    return image_id.encode("utf-8", "surrogateescape")


class SeenIds:
    """`first_seen(ids)` -> a bool per id: True the first time an id appears (in this call or
    any earlier one), False for every repeat."""

    def __init__(self, hasher: Hasher | None = None):
        self._hash = hasher or id_hash
        self._runs: list[np.ndarray] = []  # sorted keys: (hash & 0xFFFFFFFF) << 32 | number
        self._ids = tempfile.TemporaryFile(prefix="pipeline-ids-")
        self._ends = tempfile.TemporaryFile(prefix="pipeline-id-ends-")  # uint64 per number
        self._count = 0
        self._end = 0
        self._lookup: Lookup | None = None
        self._known = np.zeros(0, bool)  # per index of the lookup's set: seen already
        self._known_count = 0

    def close(self) -> None:
        self._ids.close()
        self._ends.close()

    def __len__(self) -> int:
        return self._count + self._known_count

    @property
    def knows(self) -> bool:
        return self._lookup is not None

    def know(self, lookup: Lookup) -> None:
        """From now on, ids `lookup` finds are remembered by their index (see the module's
        docstring); the ids seen so far are looked up once."""
        self._lookup = lookup
        if self._count:
            self._mark_known(self._lookup(self._stored_ids()))

    def first_seen(self, ids: Sequence[str]) -> np.ndarray:
        return self.first_seen_arrow(pa.array([_encode(i) for i in ids], pa.binary()))

    def first_seen_arrow(self, ids: pa.Array) -> np.ndarray:
        """`first_seen` of a string or binary Arrow array (no nulls)."""
        return self.first_seen_found(ids)[0]

    def first_seen_found(self, ids: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
        """(`first_seen_arrow`, the lookup's index per id, or None before `know`)."""
        if self._lookup is None or len(ids) == 0:
            return self._first_seen_unknown(ids), None
        found = self._lookup(ids)
        new = np.zeros(len(ids), bool)
        known = np.flatnonzero(found >= 0)
        if len(known):
            new[known] = self._first_known(found[known])
        if len(known) < len(ids):
            other = np.flatnonzero(found < 0)
            new[other] = self._first_seen_unknown(ids.take(pa.array(other)))
        return new, found

    def _first_known(self, index: np.ndarray) -> np.ndarray:
        """Per found id (its index): first time seen? Marks them seen."""
        first = ~self._seen_index(index)
        if len(index) > 1 and not (index[1:] > index[:-1]).all():  # rising: no repeat in it
            order = np.argsort(index, kind="stable")  # a repeat after its first, in row order
            ordered = index[order]
            repeat = np.zeros(len(index), bool)
            repeat[order[1:]] = ordered[1:] == ordered[:-1]
            first &= ~repeat
        self._known[index[first]] = True
        self._known_count += int(first.sum())
        return first

    def _seen_index(self, index: np.ndarray) -> np.ndarray:
        top = int(index.max()) + 1
        if top > len(self._known):  # grown by doubling: a byte per index of the set
            grown = np.zeros(max(top, 2 * len(self._known)), bool)
            grown[:len(self._known)] = self._known
            self._known = grown
        return self._known[index]

    def _mark_known(self, found: np.ndarray) -> None:
        index = found[found >= 0]
        if len(index):
            self._seen_index(index)
            self._known[index] = True

    def _stored_ids(self) -> pa.Array:
        """Every id stored so far (a listing's first chunk: `know` comes after it)."""
        ends = np.frombuffer(os.pread(self._ends.fileno(), self._count * 8, 0), np.uint64)
        data = os.pread(self._ids.fileno(), self._end, 0)
        offsets = np.concatenate(([0], ends.astype(np.int64)))
        return pa.LargeBinaryArray.from_buffers(pa.large_binary(), self._count,
                                                [None, pa.py_buffer(offsets), pa.py_buffer(data)])

    def _first_seen_unknown(self, ids: pa.Array) -> np.ndarray:
        new = np.zeros(len(ids), bool)
        if len(ids) == 0:
            return new
        strings = FlatStrings.of_arrow(ids)
        prefix = (self._hashes(strings, ids) & _LOW) << np.uint64(SEQ_BITS)
        order = np.argsort(prefix, kind="stable")  # by hash; equal hashes in the calls' order
        rows = order[_first_of_each(strings, prefix, order)[order]]
        fresh = rows[~self._stored(strings, prefix, rows)]
        new[fresh] = True
        if len(fresh):
            self._add(ids.take(pa.array(fresh)), prefix[fresh])
        return new

    def _hashes(self, strings: FlatStrings, ids: pa.Array) -> np.ndarray:
        if self._hash is None:
            return hash64(strings)
        return np.fromiter((self._hash(b) & MASK for b in ids.cast(pa.binary()).to_pylist()),
                           np.uint64, len(ids))

    def _stored(self, strings: FlatStrings, prefix: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Per row of `rows` (in hash order): is its id already stored? Keys are searched
        vectorized per run; only an equal hash (a repeat, or rarely a collision) reads the
        stored bytes to decide."""
        stored = np.zeros(len(rows), bool)
        queries = prefix[rows]  # sorted: searchsorted walks each run once, cache-friendly
        for run in self._runs:
            lo = np.searchsorted(run, queries, "left")
            # a key with the query's hash prefix is at lo if there is one (a repeat, or rarely
            # a collision): only those rows search for where the prefix ends
            shared = np.flatnonzero(run[np.minimum(lo, len(run) - 1)] >> _SHIFT
                                    == queries >> _SHIFT)
            hi = lo.copy()
            hi[shared] = np.searchsorted(run, queries[shared] | _LOW, "right")
            for i in np.flatnonzero((hi > lo) & ~stored):
                mine = strings.bytes_of(int(rows[i]))
                stored[i] = any(self._read(int(k & _LOW)) == mine for k in run[lo[i]:hi[i]])
        return stored

    def _add(self, ids: pa.Array, prefix: np.ndarray) -> None:
        """Store `ids` (new, in hash order) under the next numbers: their keys are sorted."""
        n = len(ids)
        if self._count + n >= 1 << SEQ_BITS:
            raise ValueError("more than 4 billion distinct ids in one listing: split the manifest")
        strings = FlatStrings.of_arrow(ids)
        length = int(strings.offsets[-1])
        os.pwrite(self._ids.fileno(), strings.data[:length].data, self._end)
        ends = (strings.offsets[1:] + self._end).astype(np.uint64)
        os.pwrite(self._ends.fileno(), ends.tobytes(), self._count * 8)
        self._end += length
        run = prefix | np.arange(self._count, self._count + n, dtype=np.uint64)
        self._count += n
        while self._runs and len(self._runs[-1]) <= len(run) \
                and len(self._runs[-1]) + len(run) <= RUN_CAP:  # keep runs of rising size
            run = _merge(self._runs.pop(), run)
        self._runs.append(run)

    def _read(self, number: int) -> bytes:
        """The bytes of id `number`."""
        if number:
            start, end = np.frombuffer(os.pread(self._ends.fileno(), 16, (number - 1) * 8),
                                       np.uint64)
        else:
            start, end = 0, np.frombuffer(os.pread(self._ends.fileno(), 8, 0), np.uint64)[0]
        return os.pread(self._ids.fileno(), int(end - start), int(start))


def _first_of_each(strings: FlatStrings, prefix: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per row: is it the first row with its id? Only rows sharing a hash prefix (repeats, or
    a collision) are compared, by their bytes."""
    first = np.ones(len(order), bool)
    sorted_prefix = prefix[order]
    equal = sorted_prefix[1:] == sorted_prefix[:-1]
    if not equal.any():
        return first
    shared = np.zeros(len(order), bool)
    shared[1:] |= equal
    shared[:-1] |= equal
    seen: set[tuple[int, bytes]] = set()
    for row in order[shared].tolist():  # hash order, the calls' order within a hash
        key = (int(prefix[row]), strings.bytes_of(row))
        if key in seen:
            first[row] = False
        seen.add(key)
    return first


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two sorted runs -> one (no temporaries beyond the result)."""
    out = np.concatenate((a, b))
    out.sort()
    return out
