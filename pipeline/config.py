"""One frozen RunConfig: built-in defaults < configs/*.toml (--config) < CLI flags."""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .exitcodes import ConfigError
from .types import (PREPROCESS_CHOICES, DeviceRequest, ModelRequest, ReadLimits, S3Options,
                    default_cache_dir)


@dataclass(frozen=True)
class RunConfig:
    input: str = ""
    output: str = "labels"
    model: str = "efficientnet_lite0"  # registry name, or a .keras file / SavedModel directory
    weights: str | None = None
    labels: str | None = None  # custom model: class names file (.txt or .json)
    input_size: int | None = None  # custom model: square input side, if the model does not fix it
    preprocess: str | None = None  # custom model: tf | torch | caffe | lite | raw
    # None ("auto"): 64 on CPU, 256 per GPU (see devices.plan)
    batch_size: int | None = field(default=None, metadata={"expects": 'a positive integer or "auto"'})
    top_k: int = 5
    part_size: int = 4096
    max_error_rate: float = 0.05
    max_pixels: int = 90_000_000
    max_file_bytes: int = 512 * 2**20
    # A JPEG whose crop is at least 3x the model input decodes at 1/2, 1/4 or 1/8 scale
    scaled_decode: bool = True
    overwrite: bool = False
    allow_empty: bool = False  # an INPUT with no images is a success, not a usage error (exit 2)
    embeddings: bool = False  # add the `embedding` column: the pooled features, L2-normalized
    runtime: str = "auto"
    precision: str = "auto"
    feed: str = "auto"  # auto | uint8 | float32 (auto: uint8 to keras, float32 to litert)
    engine: str = "local"
    ray_address: str | None = None  # --engine ray: a cluster to join; None starts a local one
    cache_dir: str = field(default_factory=default_cache_dir)
    progress: str = "auto"  # auto | bar | log | none
    log_interval: float = 30.0
    json: bool = False
    run_id: str | None = None
    s3_endpoint: str | None = None  # else AWS_ENDPOINT_URL; else AWS itself
    s3_region: str | None = None  # else AWS_REGION / AWS_DEFAULT_REGION; else us-east-1
    s3_max_attempts: int = 5
    s3_connect_timeout: float = 5.0
    s3_request_timeout: float = 30.0
    s3_lock_lease: float = 600.0
    inventory_prefix: str = ""  # S3 Inventory INPUT: only keys under it, image ids relative to it

    def __post_init__(self) -> None:
        if self.batch_size == "auto":
            object.__setattr__(self, "batch_size", None)
        check_types(self)
        if self.batch_size is not None:
            _check_positive("batch_size", self.batch_size)
        _check_positive("top_k", self.top_k)
        _check_positive("part_size", self.part_size)
        _check_positive("max_pixels", self.max_pixels)
        _check_positive("s3_max_attempts", self.s3_max_attempts)
        for name in ("s3_connect_timeout", "s3_request_timeout", "s3_lock_lease"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")
        _check_positive("max_file_bytes", self.max_file_bytes)
        if self.max_file_bytes >= 2**31:  # TensorFlow string tensors hold less than 2 GiB
            raise ConfigError(f"max_file_bytes must be below 2 GiB (2147483648), got {self.max_file_bytes}")
        if self.input_size is not None:
            _check_positive("input_size", self.input_size)
        if self.preprocess is not None:
            _check_choice("preprocess", self.preprocess, PREPROCESS_CHOICES)
        if not 0.0 <= self.log_interval < math.inf:
            raise ConfigError(f"log_interval must be a number of seconds >= 0, got {self.log_interval!r}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(f"max_error_rate must be between 0 and 1, got {self.max_error_rate}")
        _check_choice("runtime", self.runtime, ("auto", "keras", "litert"))
        _check_choice("precision", self.precision, ("auto", "float32", "float16", "bfloat16", "int8"))
        _check_choice("feed", self.feed, ("auto", "uint8", "float32"))
        _check_choice("engine", self.engine, ("local", "ray"))
        _check_choice("progress", self.progress, ("auto", "bar", "log", "none"))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # What each stage is told (run.label builds each once and passes it down).
    def read_limits(self) -> ReadLimits:
        return ReadLimits(self.max_pixels, self.max_file_bytes, self.scaled_decode)

    def device_request(self) -> DeviceRequest:
        return DeviceRequest(self.runtime, self.precision, self.batch_size, self.cache_dir,
                             self.feed)

    def model_request(self) -> ModelRequest:
        return ModelRequest(self.model, self.weights, self.labels, self.input_size,
                            self.preprocess, self.cache_dir)

    def s3_options(self) -> S3Options:
        return S3Options(self.s3_endpoint, self.s3_region, self.s3_max_attempts,
                         self.s3_connect_timeout, self.s3_request_timeout)


def check_types(config: Any) -> None:
    """Check every field of a config dataclass against its declared type (ConfigError naming
    the key), so a TOML `overwrite = "false"` or `model = 5` stops before anything runs.

    Declared types may be bool, int, float, str, or one of them `| None`. An int is accepted
    (and stored) as a float where a float is declared; a path object as a str."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        checked = _checked_value(f.name, value, hints[f.name], f.metadata.get("expects"))
        if checked is not value:
            object.__setattr__(config, f.name, checked)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _checked_value(name: str, value: Any, declared: Any, expects: str | None) -> Any:
    allowed = typing.get_args(declared) if _is_union(declared) else (declared,)
    if value is None and type(None) in allowed:
        return value
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value):
                break
            return float(value)
        if kind is str and isinstance(value, (str, os.PathLike)):
            return value if isinstance(value, str) else os.fspath(value)
    if expects is None:
        words = [_TYPE_WORDS.get(k, getattr(k, "__name__", str(k)))
                 for k in allowed if k is not type(None)]
        expects = " or ".join(words + (["unset"] if type(None) in allowed else []))
    raise ConfigError(f"config key {name} must be {expects}, got {_describe(value)}")


def _is_union(declared: Any) -> bool:
    return typing.get_origin(declared) in (typing.Union, types.UnionType)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        quoted = value.lower() in ("true", "false") or _is_number(value)
        return f"the string {value!r}" + (" (write it without quotes)" if quoted else "")
    return f"{type(value).__name__} {value!r}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(RunConfig))


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config file; keys may sit at the top level or under a [label] table."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
    table = dict(data.pop("label", {}))
    table.update(data)
    return {k.replace("-", "_"): v for k, v in table.items()}


def build_config(
    file_values: Mapping[str, Any] | None = None,
    flag_values: Mapping[str, Any] | None = None,
    source: str = "config",
) -> RunConfig:
    """Merge defaults < file values < flags (flags that are None were not given)."""
    merged: dict[str, Any] = {}
    for values, where in ((file_values or {}, source), (flag_values or {}, "flags")):
        unknown = sorted(set(values) - CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"unknown config key(s) in {where}: {', '.join(unknown)}")
        merged.update({k: v for k, v in values.items() if v is not None})
    try:
        return RunConfig(**merged)
    except TypeError as e:  # wrong value types from TOML
        raise ConfigError(str(e)) from e
