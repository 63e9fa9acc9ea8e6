"""Read a PyTorch legacy-format state dict (.pth) into numpy arrays, without torch.

Legacy layout: pickle(magic), pickle(protocol), pickle(sys_info), pickle(state dict whose
tensors reference storages by persistent id), pickle(storage keys), then for each key in that
order an int64 element count followed by the raw little-endian storage bytes.

The unpickler refuses every global except the handful needed to rebuild tensors, so a tampered
weights file cannot execute code.
"""
from __future__ import annotations

import collections
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


class UnsafeWeightsError(ValueError):
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
    """Return {name: array} from a legacy .pth file, honouring each tensor's strides."""
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            raise ValueError(f"{path} is a zip-format torch file; only the legacy format is supported")
        f.seek(0)
        if _load_pickle(f) != MAGIC_NUMBER:
            raise ValueError(f"{path} is not a PyTorch legacy weights file (bad magic number)")
        _load_pickle(f)  # protocol version
        sys_info = _load_pickle(f)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian weights files are not supported")
        state = _load_pickle(f)
        keys = _load_pickle(f)
        dtypes = {ref.storage.key: ref.storage.dtype for ref in state.values()}
        storages = {key: _read_storage(f, dtypes[key], path) for key in keys}
    return {name: _materialize(ref, storages) for name, ref in state.items()}


def _read_storage(f: BinaryIO, dtype, path: str) -> bytes:
    (numel,) = struct.unpack("<q", f.read(8))
    nbytes = numel * np.dtype(dtype).itemsize
    raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise ValueError(f"{path} is truncated")
    return raw


def _materialize(ref: _TensorRef, storages: dict) -> np.ndarray:
    raw = storages[ref.storage.key]
    itemsize = np.dtype(ref.storage.dtype).itemsize
    flat = np.frombuffer(raw, dtype=ref.storage.dtype)
    if not ref.shape:
        return flat[ref.offset].copy()
    strides = tuple(s * itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat[ref.offset:], shape=ref.shape, strides=strides)
    return np.ascontiguousarray(view)
