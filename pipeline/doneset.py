"""The done set: which listed images a run skips, with no Python object per labeled image.

Built by streaming over the committed parts (record batches of six small columns, parts of
other models skipped by their file metadata) and reduced to the latest row per image_id. Kept as
flat numpy arrays, one entry per image that matters (done, or a retried transient error):

  keys     uint64, sorted: hash(image_id) in the high bits, the entry's index in the low bits
  size     uint32 (int64 if a size does not fit), mtime int64 (us), code uint8 (0 done,
           k > 0 a transient error kind)
  ids      every entry's exact image_id bytes (one uint8 buffer + uint32 offsets, int64 past
           4 GiB of ids)

25 bytes plus the id per image. While it is built, the ids and labeled_at wait in temporary
files (not resident memory), so the build's peak is about the final size.

A lookup hashes a chunk of refs, binary-searches the keys, and confirms every candidate by
comparing the full image_id bytes: the hash only narrows the search, so a collision can cost a
comparison, never a skip. `HASH_BITS` narrows the hash (tests force collisions with it).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, fields
from typing import Callable, ContextManager, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .flatstrings import FlatStrings as _Strings, equal as _equal, hash64 as _hash, ranges
from .sortedkeys import SortedKeys
from .types import ImageRef
from .store import Store
from .store.latest import latest_rows
from .store.parts import open_part
from .store.schema import EMBEDDING

HASH_BITS = 64
# Errors that say something about the file itself: not retried while the file is unchanged.
PERMANENT_ERRORS = frozenset({"empty_file", "corrupt", "unsupported_format", "too_large",
                              "invalid_entry"})
_PERMANENT = pa.array(sorted(PERMANENT_ERRORS), pa.string())
COLUMNS = ["image_id", "file_size", "mtime", "status", "error_kind", "labeled_at"]
SLICE_ROWS = 1 << 20
BATCH_ROWS = 1 << 16  # rows per record batch while reading parts: bounds Arrow memory
NULL = np.iinfo(np.int64).min  # a null file_size / mtime
DONE = 0
_SIZE32_NULL = np.uint32(0xFFFFFFFF)  # a null file_size while sizes are kept as uint32
_DROP = 255  # latest row is done for other scores: neither done nor a retried error


@dataclass(frozen=True)
class Identity:
    """What makes two rows' scores the same: the model and everything that changes its output.

    A part's file metadata records these (`pipeline.<field>`). A field a part does not record
    (parts written before it was recorded) matches any value, so upgrading relabels nothing.

    `embeddings` asks for more, never for other scores: a run with --embeddings counts an ok
    row as done only in a part that has the embedding column; a run without takes any."""

    model: str
    weights_sha256: str | None = None
    preprocessing: str | None = None
    runtime: str | None = None  # keras | litert (as resolved for this host)
    precision: str | None = None  # the Keras dtype policy (float32, mixed_float16, ...) or int8
    feed: str | None = None  # what the model was handed: float32 input or uint8 pixels
    decode: str | None = None  # scaled (reduced-scale JPEG decode for large crops) | full
    embeddings: bool = False  # not in the metadata: a part's columns say whether it has them

    def metadata(self) -> dict[str, str]:
        return {f"pipeline.{f.name}": getattr(self, f.name) for f in self._scored()
                if getattr(self, f.name) is not None}

    def _scored(self):
        return [f for f in fields(self) if f.name != "embeddings"]

    def lacks_embeddings(self, schema: pa.Schema) -> bool:
        """Whether this run wants embeddings and a part of `schema` has none."""
        return self.embeddings and EMBEDDING not in schema.names

    def matches(self, metadata: dict[bytes, bytes]) -> bool:
        """Whether a part with this file metadata holds scores of this identity."""
        for f in self._scored():
            ours, theirs = getattr(self, f.name), metadata.get(f"pipeline.{f.name}".encode())
            if f.name != "model" and ours is not None and theirs is not None \
                    and theirs.decode() != ours:
                return False
        return True


class DoneSet:
    """Answers, for a chunk of refs, which are done and which failed the same way before."""

    def __init__(self, keys: np.ndarray, hash_bits: int, index_bits: int, size: np.ndarray,
                 mtime: np.ndarray, code: np.ndarray, ids: _Strings, kinds: list[str],
                 max_labeled_at: int = NULL):
        self._keys, self._hash_bits, self._index_bits = keys, hash_bits, index_bits
        self._size, self._mtime, self._code = size, mtime, code
        self._ids, self._kinds = ids, kinds
        self._search = SortedKeys(keys, hash_bits + index_bits)
        self.max_labeled_at = max_labeled_at  # newest labeled_at (us) of the rows it was built from

    @classmethod
    def empty(cls) -> "DoneSet":
        nothing = np.zeros(0, np.int64)
        return cls(np.zeros(0, np.uint64), 1, 1, nothing, nothing, np.zeros(0, np.uint8),
                   _Strings(np.zeros(8, np.uint8), np.zeros(1, np.int64)), [""])

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._keys, self._size, self._mtime, self._code)) + \
            self._ids.nbytes

    def check(self, refs: Sequence[ImageRef]) -> tuple[np.ndarray, list[str | None]]:
        """(is_done per ref, previous_error per ref).

        Done: the latest row is ok or a permanent error, of this identity, with the ref's size
        and mtime. previous_error: the kind of a latest transient error (retried) whose size and
        mtime equal the ref's, or whose file is still missing; else None."""
        size = np.array([NULL if r.file_size is None else r.file_size for r in refs], np.int64)
        mtime = np.array([NULL if r.mtime_ns is None else r.mtime_ns for r in refs], np.int64)
        done, failed = self.check_columns(pa.array([r.image_id for r in refs], pa.string()),
                                          size, mtime)
        previous: list[str | None] = [None] * len(refs)
        for i, kind in failed.items():
            previous[i] = kind
        return done, previous

    def check_columns(self, ids: pa.Array, size: np.ndarray, mtime_ns: np.ndarray
                      ) -> tuple[np.ndarray, dict[int, str]]:
        """`check` on columns (image_id, file_size, mtime in ns; NULL where unknown): is_done
        per row, and {row: previous error kind} for the rows that failed before."""
        return self.check_found(self.find(ids), size, mtime_ns)

    def find(self, ids: pa.Array) -> np.ndarray:
        """The entry holding each id's exact image_id (a string/binary array), or -1: an index
        into a fixed set of distinct ids (sources.KnownIds.lookup)."""
        if len(ids) == 0 or len(self._keys) == 0:
            return np.full(len(ids), -1, np.int64)
        return self._find(_Strings.of_arrow(ids))

    def check_found(self, entry: np.ndarray, size: np.ndarray, mtime_ns: np.ndarray
                    ) -> tuple[np.ndarray, dict[int, str]]:
        """`check_columns` of rows whose entries `find` gave."""
        done = np.zeros(len(entry), bool)
        found = np.flatnonzero(entry >= 0)
        if len(found) == 0:
            return done, {}
        e = entry[found]
        size, mtime_ns = size[found], mtime_ns[found]
        mtime = np.where(mtime_ns == NULL, NULL, mtime_ns // 1000)
        same = (self._sizes(e) == size) & (self._mtime[e] == mtime)
        code = self._code[e]
        done[found] = same & (code == DONE)
        failed = (code != DONE) & (same | (size == NULL))
        return done, {int(i): self._kinds[c] for i, c in zip(found[failed], code[failed])}

    def _sizes(self, e: np.ndarray) -> np.ndarray:
        return _sizes_int64(self._size[e])

    def _find(self, queries: _Strings) -> np.ndarray:
        """The entry holding each query's exact image_id, or -1."""
        return self._lookup(queries)[0]

    def _lookup(self, queries: _Strings) -> tuple[np.ndarray, np.ndarray]:
        """(entry, position in keys) of each query's exact image_id, or (-1, -1)."""
        entry = np.full(len(queries), -1, np.int64)
        position = np.full(len(queries), -1, np.int64)
        if len(self._keys) == 0:
            return entry, position
        low = np.uint64((1 << self._index_bits) - 1)
        shift = np.uint64(self._index_bits)
        base = _reduced_hash(queries, self._hash_bits) << shift
        lo = self._search.first_at_least(base)
        # a query's candidates are the keys from lo on that have its hash: more than one only
        # on a collision, so the next key is looked at only for the queries not found yet
        q, last, k = np.arange(len(base)), len(self._keys) - 1, 0
        while len(q):
            at = lo[q] + k
            inside = at <= last
            q, at = q[inside], at[inside]
            key = self._keys[at]
            same_hash = (key >> shift) == (base[q] >> shift)
            q, at, key = q[same_hash], at[same_hash], key[same_hash]
            cand = (key & low).astype(np.int64)
            same = _equal(queries, q, self._ids, cand)
            entry[q[same]] = cand[same]
            position[q[same]] = at[same]
            q = q[~same]
            k += 1
        return entry, position


def done_set(output: Store, identity: Identity, ignore: frozenset[str] = frozenset()) -> DoneSet:
    """What a run of `identity` skips, and which refs failed the same way before: see
    DoneSet.check.

    Streams over OUTPUT's data files in bounded record batches; parts named in `ignore`
    (replaced by an unfinished --overwrite) do not count. Memory: 25 bytes plus the image_id's
    length per image whose latest row is done or a retried error."""
    names = [f.name for f in output.data_files(ignore)]
    return build(names, identity, lambda name: open_part(output, name))


def build(parts: Sequence[str], identity: Identity,
          open_part: Callable[[str], ContextManager[pq.ParquetFile]]) -> DoneSet:
    """The DoneSet of `identity` from `parts` (oldest first), each opened with `open_part`."""
    rows = _Rows(_row_capacity(parts, identity.model, open_part))
    for path in parts:
        with open_part(path) as pf:
            meta = pf.schema_arrow.metadata or {}
            matches = identity.matches(meta)
            redo_ok = identity.lacks_embeddings(pf.schema_arrow)  # its errors still count
            for batch in model_batches(pf, identity.model, COLUMNS):
                rows.add(batch, matches, redo_ok)
    return rows.done_set()


def model_batches(pf: pq.ParquetFile, model: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The record batches (`columns`) of a part's rows of `model`; none if the part records
    another model, rows filtered by the model column if it records none."""
    meta = pf.schema_arrow.metadata or {}
    if not _may_hold(meta, model):
        return
    part_model = meta.get(b"pipeline.model")
    wanted = columns if part_model is not None else columns + ["model"]
    for batch in pf.iter_batches(BATCH_ROWS, columns=wanted, use_threads=False):
        if part_model is None:
            batch = batch.filter(pc.equal(batch.column("model"), model)).select(columns)
        yield batch


def _may_hold(metadata: dict[bytes, bytes], model: str) -> bool:
    """Parts record their model; a part that does not is filtered by its model column."""
    part_model = metadata.get(b"pipeline.model")
    return part_model is None or part_model.decode() == model


def _row_capacity(parts: Sequence[str], model: str, open_part) -> int:
    total = 0
    for path in parts:
        with open_part(path) as pf:
            if _may_hold(pf.schema_arrow.metadata or {}, model):
                total += pf.metadata.num_rows
    return total


class _Rows:
    """Every row of the model, in dataset order, in preallocated arrays (lazily committed, so
    the capacity taken from the parts' row counts costs nothing where it is not filled).
    The image_ids' bytes and labeled_at go to temporary files, which are not resident memory:
    the ids are read back once, only those kept, into the final buffer; labeled_at only for
    rows that share a hash. Sizes and id offsets are uint32 until a value does not fit."""

    def __init__(self, capacity: int):
        self.n = 0
        self.hash = np.empty(capacity, np.uint64)
        self.size = np.empty(capacity, np.uint32)  # _SIZE32_NULL: null; int64 once one is big
        self.mtime = np.empty(capacity, np.int64)
        self.code = np.empty(capacity, np.uint8)
        self.ends = np.empty(capacity, np.uint32)  # where each id ends in id_file (or int64)
        self.id_bytes = 0
        self.id_file = tempfile.TemporaryFile(prefix="pipeline-done-ids-")
        self.labeled_at = tempfile.TemporaryFile(prefix="pipeline-done-times-")
        self.kinds = [""]  # code k > 0 -> transient error kind
        self.max_time = NULL  # the newest labeled_at seen

    def add(self, batch: pa.RecordBatch, matches: bool, redo_ok: bool = False) -> None:
        n, s = batch.num_rows, slice(self.n, self.n + batch.num_rows)
        if n == 0:
            return
        ids = _Strings.of_arrow(batch.column("image_id"))
        self.hash[s] = _hash(ids)
        self._add_ids(s, ids)
        self._add_sizes(s, _int64(batch.column("file_size")))
        self.mtime[s] = _int64(batch.column("mtime"))
        times = _int64(batch.column("labeled_at"))
        self.labeled_at.write(times.tobytes())
        self.max_time = max(self.max_time, int(times.max()))
        self.code[s] = self._codes(batch, matches, redo_ok)
        self.n += n

    def _add_ids(self, s: slice, ids: _Strings) -> None:
        length = int(ids.offsets[-1])
        self.id_file.write(ids.data[:length].data)
        if self.id_bytes + length >= 2**32 and self.ends.dtype == np.uint32:
            self.ends = _widened(self.ends, self.n)
        self.ends[s] = ids.offsets[1:] + self.id_bytes
        self.id_bytes += length

    def _add_sizes(self, s: slice, size: np.ndarray) -> None:
        if self.size.dtype == np.uint32:
            if not ((size >= 0) & (size < _SIZE32_NULL) | (size == NULL)).all():
                self.size = _sizes_int64(self.size, self.n)
            else:
                self.size[s] = np.where(size == NULL, _SIZE32_NULL, size)
                return
        self.size[s] = size

    def _codes(self, batch: pa.RecordBatch, matches: bool, redo_ok: bool) -> np.ndarray:
        """redo_ok: the ok rows are not done (labeled without the embeddings asked for)."""
        kind = batch.column("error_kind")
        ok = pc.equal(batch.column("status"), "ok").to_numpy(zero_copy_only=False)
        permanent = pc.is_in(kind, value_set=_PERMANENT).to_numpy(zero_copy_only=False)
        code = np.full(len(ok), DONE if matches else _DROP, np.uint8)
        if redo_ok:
            code[ok] = _DROP
        for i in np.flatnonzero(~ok & ~permanent):  # transient errors: few rows
            k = str(kind[int(i)])
            if k not in self.kinds:
                self.kinds.append(k)
            code[i] = self.kinds.index(k)
        return code

    def done_set(self) -> DoneSet:
        n = self.n
        if n == 0:
            empty = DoneSet.empty()
            empty.max_labeled_at = self.max_time
            return empty
        index_bits = max(1, int(n - 1).bit_length())
        hash_bits = _hash_bits(index_bits)
        keys = self.hash[:n]
        for s in _slices(n):  # in place, a slice at a time: no temporary of n elements
            keys[s] >>= np.uint64(64 - hash_bits)
            keys[s] <<= np.uint64(index_bits)
            keys[s] |= np.arange(s.start, s.stop, dtype=np.uint64)
        keys.sort()  # in place: hash order, then dataset order
        keep = np.ones(n, bool)
        keep[self._superseded(keys, index_bits)] = False
        self.labeled_at.close()
        keep &= self.code[:n] != _DROP
        ids = self._kept_ids(keep)
        self.id_file.close()
        del self.ends  # frees it now
        if keep.all():
            return DoneSet(keys, hash_bits, index_bits, self.size[:n], self.mtime[:n],
                           self.code[:n], ids, self.kinds, self.max_time)
        return self._compacted(keys, hash_bits, index_bits, keep, ids)

    def _id_range(self, start: int, stop: int) -> tuple[int, int]:
        """Byte range of rows start..stop-1 in id_file."""
        return (int(self.ends[start - 1]) if start else 0), \
            (int(self.ends[stop - 1]) if stop else 0)

    def _kept_ids(self, keep: np.ndarray) -> _Strings:
        """The kept rows' ids read back from id_file into one exact-size buffer, a slice of rows
        at a time (never a second copy of all ids)."""
        n = self.n
        self.id_file.flush()
        total = 0
        for s in _slices(n):
            first, last = self._id_range(s.start, s.stop)
            total += (last - first) - int(self._lengths(s)[~keep[s]].sum())
        m = int(keep.sum())
        offsets = np.zeros(m + 1, np.uint32 if total + 8 < 2**32 else np.int64)
        data = np.zeros(total + 8, np.uint8)
        pos = written = 0
        for s in _slices(n):
            first, last = self._id_range(s.start, s.stop)
            raw = np.frombuffer(os.pread(self.id_file.fileno(), last - first, first), np.uint8) \
                if last > first else np.zeros(0, np.uint8)
            kept = keep[s]
            lengths = self._lengths(s)[kept]
            if kept.all():
                data[written:written + len(raw)] = raw
            else:
                starts = (np.concatenate(([first], self.ends[s.start:s.stop - 1].astype(np.int64)))
                          - first)[kept]
                data[written:written + int(lengths.sum())] = raw[ranges(starts, lengths)]
            offsets[pos + 1:pos + 1 + len(lengths)] = np.cumsum(lengths) + written
            pos += len(lengths)
            written += int(lengths.sum())
        return _Strings(data, offsets)

    def _lengths(self, s: slice) -> np.ndarray:
        return np.diff(self.ends[s].astype(np.int64), prepend=self._id_range(s.start, s.start)[0])

    def _ids_of(self, rows: np.ndarray) -> pa.Array:
        """The ids of `rows` (few: rows that share a hash), read from id_file."""
        fd = self.id_file.fileno()
        self.id_file.flush()
        values = []
        for row in rows.tolist():
            first, last = self._id_range(row, row + 1)
            values.append(os.pread(fd, last - first, first))
        return pa.array(values, pa.large_binary())

    def _superseded(self, keys: np.ndarray, index_bits: int) -> np.ndarray:
        """Rows that are not the latest of their image_id (the rule of store/latest.py). Only
        rows sharing a hash can be: relabels, and hash collisions, which the exact image_id
        tells apart."""
        low = np.uint64((1 << index_bits) - 1)
        shared = []
        n = len(keys)
        for s in _slices(n):
            lo, length = max(0, s.start - 1), s.stop - s.start
            h = keys[lo:min(n, s.stop + 1)] >> np.uint64(index_bits)
            off = s.start - lo  # h[off + i] is the hash of keys[s.start + i]
            mine = h[off:off + length]
            same = np.zeros(length, bool)
            if off:
                same |= mine == h[:length]
            else:
                same[1:] |= mine[1:] == mine[:-1]
            nxt = h[off + 1:]
            same[:len(nxt)] |= mine[:len(nxt)] == nxt
            shared.append(keys[s][same])
        shared_keys = np.concatenate(shared)
        if len(shared_keys) == 0:
            return np.zeros(0, np.int64)
        rows = (shared_keys & low).astype(np.int64)
        self.labeled_at.flush()
        times = np.memmap(self.labeled_at, np.int64, "r", shape=(self.n,))
        self.id_file.flush()
        table = pa.table({"h": shared_keys >> np.uint64(index_bits),
                          "id": self._ids_of(rows),
                          "t": np.asarray(times[rows]), "row": rows})
        del times
        table = table.take(pc.sort_indices(table, [("row", "ascending")]))  # data-file order
        superseded = np.ones(table.num_rows, bool)
        superseded[latest_rows(table, key=("h", "id"), time="t").to_numpy()] = False
        return table.column("row").to_numpy()[superseded]

    def _compacted(self, keys: np.ndarray, hash_bits: int, index_bits: int, keep: np.ndarray,
                   ids: _Strings) -> DoneSet:
        """Only the kept rows, renumbered; renumbering keeps the order, so keys stay sorted."""
        n = self.n
        new_index = np.cumsum(keep, dtype=np.uint32 if n < 2**32 else np.int64)
        m = int(new_index[-1])
        new_bits = max(1, int(m - 1).bit_length())
        low = np.uint64((1 << index_bits) - 1)
        out = np.empty(m, np.uint64)
        pos = 0
        for s in _slices(n):
            row = (keys[s] & low).astype(np.int64)
            kept = keep[row]
            k = (keys[s][kept] >> np.uint64(index_bits)) << np.uint64(new_bits)
            k |= new_index[row[kept]].astype(np.uint64) - np.uint64(1)
            out[pos:pos + len(k)] = k
            pos += len(k)
        del keys, new_index
        del self.hash
        size, mtime, code = self.size[:n][keep], self.mtime[:n][keep], self.code[:n][keep]
        del self.size, self.mtime, self.code
        return DoneSet(out, hash_bits, new_bits, size, mtime, code, ids, self.kinds,
                       self.max_time)


def _slices(n: int) -> Iterator[slice]:
    """Big arrays are transformed a slice at a time, so temporaries stay small."""
    for start in range(0, n, SLICE_ROWS):
        yield slice(start, min(n, start + SLICE_ROWS))


def _widened(a: np.ndarray, filled: int) -> np.ndarray:
    """`a` (uint32) as int64, the first `filled` values copied (the rest stays uncommitted)."""
    wide = np.empty(len(a), np.int64)
    wide[:filled] = a[:filled]
    return wide


def _sizes_int64(sizes: np.ndarray, filled: int | None = None) -> np.ndarray:
    """Sizes as int64 with NULL for null, from uint32 (with _SIZE32_NULL) or int64."""
    if sizes.dtype == np.int64:
        return sizes
    wide = _widened(sizes, len(sizes) if filled is None else filled)
    head = wide[:filled]
    head[head == int(_SIZE32_NULL)] = NULL
    return wide


def _hash_bits(index_bits: int) -> int:
    return min(HASH_BITS, 64 - index_bits)


def _reduced_hash(strings: _Strings, bits: int) -> np.ndarray:
    return _hash(strings) >> np.uint64(64 - bits)


def _int64(col: pa.Array) -> np.ndarray:
    """Integers / timestamps as int64, nulls as NULL."""
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.int64())
    return col.fill_null(NULL).to_numpy().astype(np.int64, copy=False)

