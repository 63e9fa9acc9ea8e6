"""The done index's incremental update: a saved DoneSet plus the data files committed since
becomes the next generation's arrays, without rebuilding from every part (issue 23).

The merge rule is the latest-row rule of store/latest.py applied to two sets of rows: the rows
the index was built from (covered) and the rows of the new files. It may use the index's
answer for an image only when none of the new rows could lose to a covered row, so it is
applied only when every new row of the model is newer than the newest covered row
(`max_labeled_at`), or equally new and in a file whose name sorts after every covered name
(ties go to the later row in data-file order). Then, for every image_id that appears in the
new files (any row of the model: ok, error, other scores), the latest row is among the new
rows: its old entry is dropped, and the new files' own DoneSet (built by the same `build`)
answers for it. Every other image keeps its entry. Otherwise `plan` returns None and the
caller rebuilds from the parts.

Dropped entries stay in the value arrays, unreferenced by any key (the arrays are only ever
appended to, so the old generation's bytes are streamed, not rebuilt); `doneindex` rebuilds
from the parts when they reach a quarter of the entries.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from . import doneset
from .doneset import DoneSet, Identity
from .flatstrings import FlatStrings
from .store import Store, StoredFile
from .store.parts import open_part

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # array elements streamed at a time

Pieces = Callable[[], Iterator[np.ndarray]]


@dataclass
class Merge:
    """The next generation: per array (keys, size, mtime, code, id_data, id_offsets) its
    dtype, its length and its content as a stream of pieces; and the pointer's fields."""

    hash_bits: int
    index_bits: int
    kinds: list[str]
    max_labeled_at: int
    arrays: dict[str, tuple[np.dtype, int, Pieces]]


def plan(out: Store, identity: Identity, old: DoneSet, covered: Sequence[StoredFile],
         new_files: Sequence[StoredFile]) -> Merge | None:
    """`old` (built from `covered`) with `new_files` merged in; None if the rule above does
    not allow it (logged)."""
    names = [f.name for f in new_files]
    touched, first, last = _new_rows(out, names, identity.model)
    if first is not None and not _supersedes(first, old.max_labeled_at, names, covered):
        log.info(f"done index: {len(names)} new data file(s) hold rows not newer than the index's "
                 "newest; building the done set from the parts")
        return None
    new = doneset.build(names, identity, functools.partial(open_part, out)) if names \
        else DoneSet.empty()
    removed = np.zeros(0, np.int64)  # positions in old's keys of the image_ids the new rows decide
    if touched is not None and len(old._keys):
        position = old._lookup(touched)[1]
        removed = np.unique(position[position >= 0])
    entries = len(old._size) + len(new._size)
    index_bits = max(1, (entries - 1).bit_length(), old._index_bits if len(old) else 1)
    # a built DoneSet may keep fewer hash bits than its index bits allow: never more than either
    hash_bits = min([doneset._hash_bits(index_bits)] + [d._hash_bits for d in (old, new) if len(d)])
    kinds, lut = _kinds(old._kinds, new._kinds)
    newest = old.max_labeled_at if last is None else max(old.max_labeled_at, last)
    keys = _keys(old, new, removed, index_bits, hash_bits)
    return Merge(hash_bits, index_bits, kinds, newest,
                 {"keys": keys, **_value_arrays(old, new, lut)})


def _keys(old: DoneSet, new: DoneSet, removed: np.ndarray, index_bits: int, hash_bits: int
          ) -> tuple[np.dtype, int, Pieces]:
    """The merged keys: old's without `removed`, and new's (entries after old's), sorted.
    Streamed a chunk of old's at a time with the new keys that sort into it, unless old's keys
    must be rebased (the entries outgrew the index bits): then sorted in memory."""
    new_keys = _rebased(np.array(new._keys), new, index_bits, hash_bits, len(old._size))
    new_keys.sort()  # a narrower hash can reorder keys that now share it
    n = len(old._keys)
    length = n - len(removed) + len(new_keys)
    if n and (old._index_bits, old._hash_bits) != (index_bits, hash_bits):
        keys = np.concatenate([_rebased(np.delete(old._keys, removed), old, index_bits,
                                        hash_bits, 0), new_keys])
        keys.sort(kind="stable")
        return keys.dtype, length, lambda: iter([keys])
    where = np.searchsorted(old._keys, new_keys)  # a new key sorts before old's key `where`

    def pieces() -> Iterator[np.ndarray]:
        for start in range(0, max(n, 1), CHUNK):
            stop = min(n, start + CHUNK)
            chunk = old._keys[start:stop]
            gone = removed[(removed >= start) & (removed < stop)] - start
            if len(gone):
                chunk = np.delete(chunk, gone)
            lo = np.searchsorted(where, start)
            hi = len(where) if stop >= n else np.searchsorted(where, stop)
            if hi > lo:  # inserted where they sort (keys are distinct): no sort of the chunk
                at = where[lo:hi] - start
                chunk = np.insert(chunk, at - np.searchsorted(gone, at), new_keys[lo:hi])
            yield chunk
    return np.dtype(np.uint64), length, pieces


def _new_rows(out: Store, names: Sequence[str], model: str
              ) -> tuple[FlatStrings | None, int | None, int | None]:
    """(every image_id of the model's rows in `names`, their oldest and newest labeled_at);
    (None, None, None) if there is no such row."""
    ids: list[pa.Array] = []
    first = last = None
    for name in names:
        with open_part(out, name) as pf:
            for batch in doneset.model_batches(pf, model, ["image_id", "labeled_at"]):
                if batch.num_rows == 0:
                    continue
                ids.append(batch.column("image_id").cast(pa.large_string()))
                t = doneset._int64(batch.column("labeled_at"))
                low, high = int(t.min()), int(t.max())
                first = low if first is None else min(first, low)
                last = high if last is None else max(last, high)
    if not ids:
        return None, None, None
    return FlatStrings.of_arrow(pa.concat_arrays(ids)), first, last


def _supersedes(first: int, newest_covered: int, names: Sequence[str],
                covered: Sequence[StoredFile]) -> bool:
    """Whether every new row wins against every covered row under the latest-row rule."""
    if first > newest_covered:
        return True
    return first == newest_covered and min(names) > max((f.name for f in covered), default="")


def _rebased(keys: np.ndarray, done: DoneSet, index_bits: int, hash_bits: int,
             offset: int) -> np.ndarray:
    """`done`'s keys (a fresh array, changed in place) for `index_bits`/`hash_bits`, entries
    moved up by `offset`. The hash only narrows (hash_bits <= done's), so it is derived from
    the key itself: the reduced hash is the 64-bit hash's top bits."""
    if len(keys) == 0 or (done._index_bits, done._hash_bits, offset) == (index_bits, hash_bits, 0):
        return keys
    narrower = done._hash_bits - hash_bits
    assert narrower >= 0
    low = np.uint64((1 << done._index_bits) - 1)
    for start in range(0, len(keys), CHUNK):
        k = keys[start:start + CHUNK]
        entry = (k & low) + np.uint64(offset)
        k >>= np.uint64(done._index_bits + narrower)
        k <<= np.uint64(index_bits)
        k |= entry
    return keys


def _kinds(old: list[str], new: list[str]) -> tuple[list[str], np.ndarray]:
    """The merged list of transient error kinds, and new code -> merged code."""
    kinds = list(old)
    for kind in new:
        if kind not in kinds:
            kinds.append(kind)
    if len(kinds) > 255:
        raise ValueError("more than 254 transient error kinds")
    return kinds, np.array([kinds.index(k) for k in new], np.uint8)


def _value_arrays(old: DoneSet, new: DoneSet, lut: np.ndarray
                  ) -> dict[str, tuple[np.dtype, int, Pieces]]:
    """size, mtime, code, id_data, id_offsets: the old generation's, then the new entries'."""
    n = len(old._size) + len(new._size)
    narrow = all(a.dtype == np.uint32 for a in (old._size, new._size) if len(a))
    size_type = np.dtype(np.uint32) if narrow else np.dtype(np.int64)
    old_bytes, new_bytes = int(old._ids.offsets[-1]), int(new._ids.offsets[-1])
    total = old_bytes + new_bytes
    offset_type = np.dtype(np.uint32) if total + 8 < 2**32 else np.dtype(np.int64)

    def sizes() -> Iterator[np.ndarray]:
        for a in (old._size, new._size):
            for piece in _chunks(a):
                yield doneset._sizes_int64(piece) if size_type == np.int64 else piece

    def codes() -> Iterator[np.ndarray]:
        yield from _chunks(old._code)
        yield lut[new._code]

    def offsets() -> Iterator[np.ndarray]:
        yield from _chunks(old._ids.offsets)
        yield new._ids.offsets[1:].astype(np.int64) + old_bytes

    def id_data() -> Iterator[np.ndarray]:
        yield from _chunks(old._ids.data[:old_bytes])
        yield from _chunks(new._ids.data[:new_bytes])
        yield np.zeros(8, np.uint8)  # the padding FlatStrings reads whole words over

    return {"size": (size_type, n, sizes),
            "mtime": (np.dtype(np.int64), n, lambda: _joined(old._mtime, new._mtime)),
            "code": (np.dtype(np.uint8), n, codes),
            "id_data": (np.dtype(np.uint8), total + 8, id_data),
            "id_offsets": (offset_type, n + 1, offsets)}


def _joined(*arrays: np.ndarray) -> Iterator[np.ndarray]:
    for a in arrays:
        yield from _chunks(a)


def _chunks(a: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(a), CHUNK):
        yield a[start:start + CHUNK]
