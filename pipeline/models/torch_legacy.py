"""Read a PyTorch legacy-format state dict (.pth) into numpy arrays, without torch.

Legacy layout: pickle(magic), pickle(protocol), pickle(sys_info), pickle(state dict whose
tensors reference storages by persistent id), pickle(storage keys), then for each key in that
order an int64 element count followed by the raw little-endian storage bytes.

The unpickler refuses every global except the handful needed to rebuild tensors, so a tampered
weights file cannot execute code.
"""
from __future__ import annotations

import collections
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class WeightsFileError(ValueError):
    """The weights file is malformed or not a legacy PyTorch file; the message names it."""


class UnsafeWeightsError(WeightsFileError):
    """The weights file asks to load something other than tensors."""


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: Any
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored):
    if not isinstance(storage, _StorageRef):
        raise WeightsFileError("a tensor without a storage")
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(tensor, *_ignored):
    return tensor


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeWeightsError(f"weights file refers to {module}.{name}, which is not allowed")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafeWeightsError(f"unexpected persistent id in weights file: {pid!r}")
        storage_type, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise UnsafeWeightsError("storage of an unknown type in weights file")
        return _StorageRef(str(key), _STORAGE_DTYPES[storage_type.name], int(numel))


def _load_pickle(f: BinaryIO) -> Any:
    return _RestrictedUnpickler(f).load()


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Return {name: array} from a legacy .pth file, honouring each tensor's strides.

    Every tensor is checked against its storage before it is read (a crafted stride or offset
    would otherwise read outside it, or crash the process): any malformed file raises
    WeightsFileError naming the file.
    """
    try:
        with open(path, "rb") as f:
            return _load(f, path)
    except WeightsFileError as e:
        raise type(e)(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError, KeyError,
            AttributeError, IndexError, OverflowError, RecursionError) as e:
        raise WeightsFileError(f"{path}: not a readable PyTorch legacy weights file "
                               f"({type(e).__name__}: {e})") from None


def _load(f: BinaryIO, path: str) -> dict[str, np.ndarray]:
    if f.read(2) == b"PK":
        raise WeightsFileError("a zip-format torch file; only the legacy format is supported")
    f.seek(0)
    if _load_pickle(f) != MAGIC_NUMBER:
        raise WeightsFileError("not a PyTorch legacy weights file (bad magic number)")
    _load_pickle(f)  # protocol version
    sys_info = _load_pickle(f)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise WeightsFileError("big-endian weights files are not supported")
    state = _checked_state(_load_pickle(f))
    keys = _load_pickle(f)
    storages = _storages_of(state)
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise WeightsFileError("the storage list does not match the tensors' storages")
    file_size = os.fstat(f.fileno()).st_size
    raw = {str(key): _read_storage(f, storages[str(key)], file_size) for key in keys}
    return {name: _materialize(name, ref, raw[ref.storage.key]) for name, ref in state.items()}


def _checked_state(state) -> dict[str, _TensorRef]:
    if not isinstance(state, dict):
        raise WeightsFileError(f"the state is a {type(state).__name__}, not a dict of tensors")
    for name, ref in state.items():
        if not isinstance(name, str) or not isinstance(ref, _TensorRef):
            raise WeightsFileError(f"entry {name!r} is not a tensor")
    return state


def _storages_of(state: dict[str, _TensorRef]) -> dict[str, _StorageRef]:
    storages: dict[str, _StorageRef] = {}
    for name, ref in state.items():
        seen = storages.setdefault(ref.storage.key, ref.storage)
        if seen != ref.storage:
            raise WeightsFileError(f"tensor {name} gives storage {ref.storage.key} another "
                                   f"type or size")
    return storages


def _read_storage(f: BinaryIO, storage: _StorageRef, file_size: int) -> bytes:
    (numel,) = struct.unpack("<q", f.read(8))
    if numel != storage.numel or numel < 0:
        raise WeightsFileError(f"storage {storage.key} holds {numel} elements, its tensors "
                               f"say {storage.numel}")
    nbytes = numel * np.dtype(storage.dtype).itemsize
    if nbytes > file_size - f.tell():
        raise WeightsFileError("the file is truncated")
    return f.read(nbytes)


def _materialize(name: str, ref: _TensorRef, raw: bytes) -> np.ndarray:
    flat = np.frombuffer(raw, dtype=ref.storage.dtype)
    _check_bounds(name, ref, len(flat))
    if not ref.shape:
        return flat[ref.offset].copy()
    itemsize = flat.itemsize
    strides = tuple(s * itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat[ref.offset:], shape=ref.shape, strides=strides)
    return np.ascontiguousarray(view)


def _check_bounds(name: str, ref: _TensorRef, numel: int) -> None:
    """Every element the tensor addresses lies inside its storage, and it has no more
    elements than the storage (as_strided trusts both)."""
    ints = (ref.offset, *ref.shape, *ref.stride)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
        raise WeightsFileError(f"tensor {name} has a non-integer size, stride or offset")
    if len(ref.shape) != len(ref.stride) or min(ints) < 0:
        raise WeightsFileError(f"tensor {name} has a negative or mismatched size, stride or "
                               f"offset")
    elements = int(np.prod(ref.shape, dtype=object))
    if elements == 0:
        return
    last = ref.offset + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride))
    if last >= numel or elements > numel:
        raise WeightsFileError(f"tensor {name} reaches element {last} of a storage of {numel}")
