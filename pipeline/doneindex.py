"""The done index: a DoneSet persisted beside the parts, under OUTPUT/_index/, memory-mapped when
it is loaded again instead of rebuilt (issue 23, item 1; first step: format, save, validated load).

  _index/done-<token>.<array>.npy   the DoneSet's arrays (np.save), written once, never changed
  _index/done.json                  the pointer: which files, their lengths and crc32, the
                                    identity and HASH_BITS they answer for, and the data files
                                    (name, size) they were built from

The arrays are written first (each atomically, through the store), then the pointer (one atomic
write, fenced like every store write): a kill at any point leaves the old pointer and its files,
or the new ones. `load` trusts nothing it cannot check: a missing pointer, another identity or
HASH_BITS, other data files than it covers (added, deleted, replaced or resized: stale), or an
array file whose length or crc32 differs (damaged) gives None, with a log line saying why, and
the caller builds the done set from the parts. The loaded arrays are np.load(mmap_mode='r').

Not yet: an incremental merge of new parts, compaction keeping it valid, S3 (save/load are
local-OUTPUT only for now), and wiring it into run.label.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import zlib
from typing import Sequence

import numpy as np

from . import doneset
from .doneset import DoneSet, Identity
from .flatstrings import FlatStrings
from .store import Store, StoredFile, layout

log = logging.getLogger(__name__)

FORMAT = 1
POINTER = layout.index_file("done.json")
PREFIX = "done-"
ARRAYS = ("keys", "size", "mtime", "code", "id_data", "id_offsets")
_CRC_CHUNK = 16 << 20


def _arrays(done: DoneSet) -> dict[str, np.ndarray]:
    return {"keys": done._keys, "size": done._size, "mtime": done._mtime, "code": done._code,
            "id_data": done._ids.data, "id_offsets": done._ids.offsets}


def save(out: Store, done: DoneSet, identity: Identity, covered: Sequence[StoredFile]) -> None:
    """Persist `done` (built by `identity` from exactly the data files `covered`)."""
    if not _is_local(out):
        return
    token = secrets.token_hex(6)
    files = {}
    for field, array in _arrays(done).items():
        name = layout.index_file(f"{PREFIX}{token}.{field}.npy")
        out.write_file(name, _npy_writer(array))
        files[field] = {"name": name, "bytes": _size(out, name), "crc32": _crc32(out.uri(name))}
    pointer = {"format": FORMAT, "identity": dataclasses.asdict(identity),
               "hash_bits_setting": doneset.HASH_BITS, "hash_bits": done._hash_bits,
               "index_bits": done._index_bits, "kinds": done._kinds,
               "covered": [[f.name, f.size] for f in covered], "files": files}
    old = _referenced(out)
    out.write_json(POINTER, pointer)
    keep = {f["name"] for f in files.values()}
    out.delete([n for n in old if n not in keep])


def _npy_writer(array: np.ndarray):
    def write(f) -> None:
        np.save(f, np.ascontiguousarray(array))
    return write


def load(out: Store, identity: Identity, covered: Sequence[StoredFile]) -> DoneSet | None:
    """The saved DoneSet if it answers for `identity` over exactly `covered`, memory-mapped;
    else None (logged: why it is not used)."""
    if not _is_local(out):
        return None
    try:
        pointer = out.read_json(POINTER)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _unusable(f"its pointer {out.uri(POINTER)} is unreadable ({e})")
        return None
    why = _mismatch(pointer, identity, covered)
    if why:
        _unusable(why)
        return None
    try:
        arrays = {field: _mapped(out, pointer["files"][field]) for field in ARRAYS}
    except (OSError, ValueError, KeyError, TypeError) as e:
        _unusable(f"it is damaged ({e})")
        return None
    return DoneSet(arrays["keys"], int(pointer["hash_bits"]), int(pointer["index_bits"]),
                   arrays["size"], arrays["mtime"], arrays["code"],
                   FlatStrings(arrays["id_data"], arrays["id_offsets"]), list(pointer["kinds"]))


def _mismatch(pointer: dict, identity: Identity, covered: Sequence[StoredFile]) -> str | None:
    if not isinstance(pointer, dict) or pointer.get("format") != FORMAT:
        return "its pointer is not of this format"
    if pointer.get("identity") != dataclasses.asdict(identity):
        return "it was built for another identity"
    if pointer.get("hash_bits_setting") != doneset.HASH_BITS:
        return "it was built with another hash width"
    if pointer.get("covered") != [[f.name, f.size] for f in covered]:
        return "the data files changed since it was built (stale)"
    return None


def _mapped(out: Store, entry: dict) -> np.ndarray:
    path = out.uri(entry["name"])
    if _size(out, entry["name"]) != entry["bytes"]:
        raise ValueError(f"{path} has another length than the pointer records")
    if _crc32(path) != entry["crc32"]:
        raise ValueError(f"{path} has another checksum than the pointer records")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _unusable(why: str) -> None:
    log.info(f"done index not used: {why}; building the done set from the parts")


def _referenced(out: Store) -> list[str]:
    return [layout.join(layout.INDEX, n) for n in out.names(layout.INDEX) if n.startswith(PREFIX)]


def _is_local(out: Store) -> bool:
    from .store.local import LocalStore

    return isinstance(out, LocalStore)


def _size(out: Store, name: str) -> int:
    for f in out.files(layout.INDEX):
        if f.name == name:
            return f.size
    raise FileNotFoundError(out.uri(name))


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def pointer_json(out: Store) -> dict:
    """The pointer as saved (for tests and diagnostics)."""
    return json.loads(out.read_bytes(POINTER))
