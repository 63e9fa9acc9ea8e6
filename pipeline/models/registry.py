"""Lookup: a ModelRequest (registry name or custom model path) -> ModelSpec."""
from __future__ import annotations

import os
from functools import lru_cache

from ..exitcodes import ConfigError
from ..types import ModelRequest, ModelSpec
from . import bundle, custom, keras_apps, lite
from .base import RegistryEntry


@lru_cache(maxsize=1)
def _entries() -> dict[str, RegistryEntry]:
    return {e.name: e for e in [*lite.entries(), *keras_apps.entries()]}


def list_entries() -> list[RegistryEntry]:
    return list(_entries().values())


def available() -> list[str]:
    return list(_entries())


_CUSTOM_ONLY = ("labels", "input_size", "preprocess")


def get(request: ModelRequest) -> ModelSpec:
    """Resolve a registry name or a custom model path to a ModelSpec, or raise ConfigError
    saying what to do."""
    name = request.model
    entry = _entries().get(name)
    if entry is None:
        if os.path.isdir(name) and bundle.is_bundle(name):
            return bundle.bundle_spec(name, request)
        if custom.looks_like_path(name):
            return custom.make_spec(name, request)
        raise ConfigError(f"unknown model {name!r}: not a registry name (`pipeline models` "
                          f"lists them) nor a .keras file or SavedModel directory")
    given = [f"--{k.replace('_', '-')}" for k in _CUSTOM_ONLY if getattr(request, k) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} only apply to a custom model (--model PATH); "
                          f"{name} brings its own")
    if request.weights and not os.path.isfile(request.weights):
        raise ConfigError(f"--weights file not found: {request.weights}")
    return entry.make_spec(request)
