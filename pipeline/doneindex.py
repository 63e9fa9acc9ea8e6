"""The done index: a DoneSet persisted beside the parts, under OUTPUT/_index/, memory-mapped when
a run starts instead of rebuilt from every part, and brought up to date by merging only the data
files committed since (issue 23).

  _index/done-<token>.<array>.npy   one generation's arrays (.npy), written once, never changed
  _index/done.json                  the pointer: which generation, its files' lengths and crc32,
                                    the identity and HASH_BITS it answers for, the newest
                                    labeled_at of its rows, and the data files (name, size) it
                                    covers

A generation's arrays are written first (each atomically, through the store), then the pointer
(one atomic write, fenced like every store write), then the previous generation's files are
deleted: a kill at any point leaves the old pointer and its files, or the new ones.

`done_set` (at a run's start) trusts nothing it cannot check: a missing or unreadable pointer,
another identity or HASH_BITS, a covered data file that is gone or has another size (stale: a
deleted part, a compaction that rewrote parts the index had not merged), an array file whose
length or crc32 differs (damaged), or too many superseded entries: the done set is built from
the parts, with a log line saying why. Data files the index does not cover are merged in (see
donemerge.py for the rule, and when it refuses).
`refresh` (after the run's parts are committed) saves the generation that covers OUTPUT's data
files as they are then, so the next run finds nothing, or only what came after, to merge.
`follow_replacement` (after a compaction) points the generation at the compacted files.

Local and S3 OUTPUTs alike: every byte goes through the output store. On S3 an array is written
as one PUT or a multipart upload (S3 shows the object only when complete), the pointer as one
PUT fenced by the lease; an array is read with one streamed GET into a private temporary file
in TMPDIR (unnamed: gone when the run ends, however it ends), checked as it streams, and
memory-mapped.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import secrets
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Sequence

import numpy as np

from . import doneset, donemerge
from .doneset import DoneSet, Identity
from .flatstrings import FlatStrings
from .store import Store, StoredFile, layout
from .store.parts import open_part

log = logging.getLogger(__name__)

FORMAT = 2
POINTER = layout.index_file("done.json")
PREFIX = "done-"
ARRAYS = ("keys", "size", "mtime", "code", "id_data", "id_offsets")
MAX_SUPERSEDED = 0.25  # rebuild from the parts when this share of entries is unreferenced


@dataclass
class Basis:
    """What a run's done set answers for: `covered` data files; `saved` if it is the saved
    generation for exactly them."""

    done: DoneSet
    covered: list[StoredFile]
    saved: bool


@dataclass
class Loaded:
    done: DoneSet
    covered: list[StoredFile]
    new: list[StoredFile]  # data files present now that the index does not cover


def done_set(out: Store, identity: Identity, ignore: frozenset[str] = frozenset()
             ) -> tuple[DoneSet, Basis | None]:
    """What a run of `identity` skips (see doneset.DoneSet.check), from the index where it is
    valid. `ignore` (the parts an unfinished --overwrite replaces) bypasses the index: the done
    set is built from the other parts, and no index is saved (Basis None)."""
    if ignore:
        return doneset.done_set(out, identity, ignore), None
    files = out.data_files()
    loaded, merged = load(out, identity, files), 0
    if loaded is not None and loaded.new:
        saved, merged = save(out, identity, loaded.done, loaded.covered, loaded.new), len(loaded.new)
        del loaded  # its arrays are not held while the new generation loads
        loaded = load(out, identity, files) if saved else None
    if loaded is None:
        built = doneset.build([f.name for f in files], identity,
                              functools.partial(open_part, out))
        return built, Basis(built, files, saved=False)
    log.info(f"done index used: {len(loaded.done)} entries"
             + (f", {merged} new data file(s) merged in" if merged else ""))
    return loaded.done, Basis(loaded.done, loaded.covered, saved=True)


def refresh(out: Store, identity: Identity, basis: Basis | None) -> None:
    """After a run committed its parts (under the lock): save the generation covering OUTPUT's
    data files now, merging what was committed since `basis`."""
    if basis is None:
        return
    files = out.data_files()
    new = _new_files(basis.covered, files)
    if new is None:
        log.info("done index not saved: data files it covered changed during the run")
        return
    if not new and basis.saved:
        _delete_unreferenced(out)  # a kill between a pointer write and the deletion left them
        return
    if not save(out, identity, basis.done, basis.covered, new) and not basis.saved:
        save(out, identity, basis.done, basis.covered, [])


def save(out: Store, identity: Identity, old: DoneSet, covered: Sequence[StoredFile],
         new: Sequence[StoredFile]) -> bool:
    """Save `old` (built from exactly `covered`) with the data files `new` merged in as the
    next generation; False (nothing written) if the merge rule does not allow it."""
    merge = donemerge.plan(out, identity, old, covered, new)
    if merge is None:
        return False
    token = secrets.token_hex(6)
    files = {}
    for field in ARRAYS:
        name = layout.index_file(f"{PREFIX}{token}.{field}.npy")
        written: dict = {"name": name}
        out.write_file(name, _npy_writer(*merge.arrays[field], written))
        files[field] = written
    pointer = {"format": FORMAT, "identity": dataclasses.asdict(identity),
               "hash_bits_setting": doneset.HASH_BITS, "hash_bits": merge.hash_bits,
               "index_bits": merge.index_bits, "kinds": merge.kinds,
               "max_labeled_at": merge.max_labeled_at,
               "covered": [[f.name, f.size] for f in sorted([*covered, *new],
                                                             key=lambda f: f.name)],
               "files": files}
    out.write_json(POINTER, pointer)
    _delete_unreferenced(out, {f["name"] for f in files.values()})
    return True


def follow_replacement(out: Store, removed: Sequence[str], added: Sequence[str]) -> None:
    """After a compaction replaced the data files `removed` by `added` (in OUTPUT now): the
    pointer covers the added files instead, when it covered every removed one. A compaction
    keeps the latest row of each (image_id, model), which is all a done set depends on, so the
    generation answers as before. Otherwise (it rewrote parts the index had not merged yet) the
    index is left as it is, and the next run finds it stale."""
    try:
        pointer = out.read_json(POINTER)
        covered = {str(name): int(size) for name, size in pointer["covered"]}
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.info(f"done index not updated after the compaction: unreadable pointer ({e})")
        return
    if not all(name in covered for name in removed):
        log.info("done index not updated after the compaction: it rewrote data files the index "
                 "does not cover yet (the next run rebuilds it)")
        return
    kept = set(covered) - set(removed)
    now = {f.name: f.size for f in out.data_files()}
    if any(now.get(name) != covered[name] for name in kept) or not set(added) <= set(now):
        return  # already stale, or the swap is unfinished: the next run says why
    pointer["covered"] = sorted([name, now[name]] for name in kept | set(added))
    out.write_json(POINTER, pointer)


def _delete_unreferenced(out: Store, keep: set[str] | None = None) -> None:
    """Delete the generation files the pointer (whose files are `keep`) does not name."""
    if keep is None:
        keep = {f["name"] for f in out.read_json(POINTER)["files"].values()}
    gone = [n for n in _generation_files(out) if n not in keep]
    if gone:
        out.delete(gone)


def _npy_writer(dtype: np.dtype, length: int, pieces: donemerge.Pieces, written: dict
                ) -> Callable[[BinaryIO], None]:
    """Writes a 1-d .npy of `length` `dtype` values from `pieces`; records bytes and crc32."""
    def write(f: BinaryIO) -> None:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {
            "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": (length,)})
        crc, size, count = zlib.crc32(header.getvalue()), len(header.getvalue()), 0
        f.write(header.getvalue())
        for piece in pieces():
            data = np.ascontiguousarray(piece, dtype).data
            f.write(data)
            crc, size, count = zlib.crc32(data, crc), size + data.nbytes, count + len(piece)
        if count != length:
            raise AssertionError(f"wrote {count} of {length} values")
        written.update(bytes=size, crc32=crc)
    return write


def load(out: Store, identity: Identity, files: Sequence[StoredFile]) -> Loaded | None:
    """The saved DoneSet, memory-mapped, if it answers for `identity` and every data file it
    covers is among `files` unchanged; else None (logged: why it is not used)."""
    try:
        pointer = out.read_json(POINTER)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return _unusable(f"its pointer {out.uri(POINTER)} is unreadable ({e})")
    why = _mismatch(pointer, identity)
    if why:
        return _unusable(why)
    covered = [StoredFile(str(name), int(size)) for name, size in pointer["covered"]]
    new = _new_files(covered, files)
    if new is None:
        return _unusable("a data file it covers is gone or changed size (stale)")
    try:
        sizes = {f.name: f.size for f in out.files(layout.INDEX)}
        arrays = {field: _mapped(out, pointer["files"][field], sizes) for field in ARRAYS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return _unusable(f"it is damaged ({e})")
    if len(arrays["size"]) - len(arrays["keys"]) > MAX_SUPERSEDED * len(arrays["size"]):
        return _unusable("more than a quarter of its entries are superseded")
    done = DoneSet(arrays["keys"], int(pointer["hash_bits"]), int(pointer["index_bits"]),
                   arrays["size"], arrays["mtime"], arrays["code"],
                   FlatStrings(arrays["id_data"], arrays["id_offsets"]), list(pointer["kinds"]),
                   int(pointer["max_labeled_at"]))
    return Loaded(done, covered, new)


def _mismatch(pointer: dict, identity: Identity) -> str | None:
    if not isinstance(pointer, dict) or pointer.get("format") != FORMAT:
        return "its pointer is not of this format"
    if pointer.get("identity") != dataclasses.asdict(identity):
        return "it was built for another identity"
    if pointer.get("hash_bits_setting") != doneset.HASH_BITS:
        return "it was built with another hash width"
    return None


def _new_files(covered: Sequence[StoredFile], files: Sequence[StoredFile]
               ) -> list[StoredFile] | None:
    """The `files` not in `covered`; None if a covered file is missing or has another size."""
    present = {f.name: f.size for f in files}
    if any(present.get(f.name) != f.size for f in covered):
        return None
    names = {f.name for f in covered}
    return [f for f in files if f.name not in names]


def _mapped(out: Store, entry: dict, sizes: dict[str, int]) -> np.ndarray:
    """The array file of a pointer `entry`, memory-mapped, once its length (`sizes`: the
    index folder's files by name) and crc32 are as the pointer records."""
    name, where = entry["name"], out.uri(entry["name"])
    if name not in sizes:
        raise FileNotFoundError(where)
    if sizes[name] != entry["bytes"]:
        raise ValueError(f"{where} has another length than the pointer records")
    read = _Checksum()
    with out.open_local(name, read.update) as f:
        if (read.bytes, read.crc32) != (entry["bytes"], entry["crc32"]):
            raise ValueError(f"{where} has another checksum than the pointer records")
        return _memmap(f, where)


class _Checksum:
    def __init__(self) -> None:
        self.bytes = self.crc32 = 0

    def update(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        self.crc32 = zlib.crc32(chunk, self.crc32)


def _memmap(f: BinaryIO, where: str) -> np.ndarray:
    """The 1-d .npy array in the open file `f`, memory-mapped (np.load maps only a file name:
    an S3 array's temporary file has none)."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{where} is not a .npy file of a known version")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
        else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(f)
    if len(shape) != 1 or dtype.hasobject:
        raise ValueError(f"{where} is not a 1-d array of numbers")
    return np.memmap(f, dtype, "r", offset=f.tell(), shape=shape)


def _unusable(why: str) -> "Loaded | None":
    log.info(f"done index not used: {why}; building the done set from the parts")
    return None


def _generation_files(out: Store) -> list[str]:
    return [layout.join(layout.INDEX, n) for n in out.names(layout.INDEX) if n.startswith(PREFIX)]


def pointer_json(out: Store) -> dict:
    """The pointer as saved (for tests and diagnostics)."""
    return json.loads(out.read_bytes(POINTER))
