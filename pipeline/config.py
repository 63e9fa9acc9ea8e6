"""One frozen RunConfig: built-in defaults < configs/*.toml (--config) < CLI flags."""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .exitcodes import ConfigError
from .options import (below, check_options, narrow, option, positive_int, positive_seconds,
                      seconds_from_zero, within)
from .types import (PREPROCESS_CHOICES, DeviceRequest, ModelRequest, ReadLimits, S3Options,
                    default_cache_dir)


@dataclass(frozen=True)
class RunConfig:
    """Every option of `pipeline label`, each declared once (see options.py): its TOML key, its
    flag and --help line, its checks; the narrow types' defaults are written in types.py."""

    input: str = option("", argument="INPUT", help=(
        "Folder or s3://bucket/prefix/ of images (recursive), a single image, a manifest: .txt "
        "(a path per line), .csv/.parquet (column 'path', optional 'id'), or an S3 Inventory's "
        "manifest.json (local or s3://): its rows are the listing."))
    output: str = option("labels", argument="OUTPUT", help=(
        "Parquet dataset directory (created if missing) or s3://bucket/prefix/."))
    # the model (ModelRequest)
    model: str = option(ModelRequest.model, feeds=ModelRequest, default_help="", help=(
        "Registry name (see `pipeline models`), or a custom model: a .keras file or SavedModel "
        "directory. Default: efficientnet_lite0, embedded, works offline."))
    weights: str | None = option(ModelRequest.weights, feeds=ModelRequest, help=(
        "Weights file for a registry MODEL (air-gapped hosts): the .h5 Keras downloads, or a "
        "Lite .pth."))
    labels: str | None = option(ModelRequest.labels, feeds=ModelRequest, help=(
        "Custom model: class names, .txt (one per line) or .json (list, {index: name} or "
        "{index: [id, name]})."))
    input_size: int | None = option(ModelRequest.input_size, feeds=ModelRequest,
                                    check=positive_int, help=(
        "Custom model: input side in pixels, if the model does not fix it."))
    preprocess: str | None = option(ModelRequest.preprocess, feeds=ModelRequest,
                                    choices=PREPROCESS_CHOICES, help=(
        "Custom model: {choices} (its keras preprocess_input mode; raw = 0..255)."))
    batch_size: int | None = option(
        DeviceRequest.batch_size, feeds=DeviceRequest, check=positive_int, auto_is_unset=True,
        expects='a positive integer or "auto"', default_help="auto: 64 on CPU, 256 per GPU",
        help="Images per inference batch.")
    top_k: int = option(5, check=positive_int, help="Labels kept per image.")
    part_size: int = option(4096, check=positive_int, help="Rows per committed Parquet part.")
    overwrite: bool = option(False, flags=("--overwrite",), help=(
        "Relabel every input with MODEL; the earlier rows of MODEL stay readable until this run "
        "completes, then are removed (a killed run is continued by the next run of MODEL)."))
    max_error_rate: float = option(0.05, check=within(0.0, 1.0, "between 0 and 1"), help=(
        "Fraction of new inputs allowed to fail before exit code 1 (a failure unchanged since "
        "the last run does not count)."))
    allow_empty: bool = option(False, flags=("--allow-empty",), help=(
        "An INPUT with no images exits 0 (else exit 2: an empty or unmounted folder, an empty "
        "manifest)."))
    embeddings: bool = option(False, flags=("--embeddings",), help=(
        "Add an `embedding` column: the network's pooled features (EfficientNet-Lite0: 1280 "
        "float16 values, L2-normalized) from the same forward pass. Rows labeled without one "
        "are labeled again."))
    # what the reader refuses, and how it decodes (ReadLimits)
    max_pixels: int = option(ReadLimits.max_pixels, feeds=ReadLimits, check=positive_int,
                             help="Refuse images above this many pixels, read from the header.")
    max_file_bytes: int = option(
        ReadLimits.max_file_bytes, feeds=ReadLimits,
        # TensorFlow string tensors hold less than 2 GiB
        check=(positive_int, below(2**31, "2 GiB (2147483648)")),
        help="Refuse files above this many bytes without reading them.")
    scaled_decode: bool = option(
        ReadLimits.scaled_decode, feeds=ReadLimits, flags=("--scaled-decode/--no-scaled-decode",),
        help=("A JPEG whose crop is at least 3x the model input (a phone photo) decodes at 1/2, "
              "1/4 or 1/8 scale, the smallest that keeps 1.5x the input size {default}. Off: "
              "full-scale decode (scores differ slightly, so switching relabels: see README)."))
    # where and how the model runs (DeviceRequest)
    runtime: str = option(
        DeviceRequest.runtime, feeds=DeviceRequest, choices=("auto", "keras", "litert"),
        default_help="auto: litert (XNNPACK) on CPU hosts, keras on GPU hosts", help="{choices}.")
    precision: str = option(
        DeviceRequest.precision, feeds=DeviceRequest,
        choices=("auto", "float32", "float16", "bfloat16", "int8"),
        default_help="auto: mixed float16 on GPUs with compute capability >= 7.0, float32 otherwise",
        help=("{choices} {default}. float16/bfloat16 need the keras runtime; int8 (full-integer, "
              "calibrated on shipped photos) the litert runtime."))
    feed: str = option(
        DeviceRequest.feed, feeds=DeviceRequest, choices=("auto", "uint8", "float32"),
        default_help="auto: uint8 pixels to keras, normalized on its device; float32 input to litert",
        help="{choices}: what the reader hands the model.")
    engine: str = option("local", choices=("local", "ray"), help=(
        "local (this process) | ray (Ray Data, needs pipeline[ray])."))
    ray_address: str | None = option(
        None, default_help="$RAY_ADDRESS, else a local cluster on this machine",
        help="--engine ray: the cluster to join, e.g. ray://head:10001 or auto.")
    cache_dir: str = option(default_factory=default_cache_dir, feeds=(DeviceRequest, ModelRequest),
                            default_help="~/.cache/pipeline", help="Converted weights cache.")
    # what the run shows
    progress: str = option("auto", choices=("auto", "bar", "log", "none"), default_help="",
                           help=("auto (bar on a terminal, log line every 30 s otherwise) | bar "
                                 "| log | none."))
    log_interval: float = option(30.0, check=seconds_from_zero, cli=False)
    json: bool = option(False, flags=("--json",), help="Print the summary as one JSON object.")
    run_id: str | None = option(None, cli=False)
    # how S3 is reached (S3Options), and the lock on an S3 OUTPUT
    s3_endpoint: str | None = option(
        S3Options.endpoint, feeds=S3Options, as_name="endpoint",
        default_help="$AWS_ENDPOINT_URL, else AWS",
        help="S3-compatible endpoint URL, e.g. http://minio:9000.")
    s3_region: str | None = option(S3Options.region, feeds=S3Options, as_name="region",
                                   default_help="$AWS_REGION, else us-east-1", help="S3 region.")
    s3_max_attempts: int = option(
        S3Options.max_attempts, feeds=S3Options, as_name="max_attempts", check=positive_int,
        help="Attempts per S3 request, with backoff (timeouts, 5xx, throttling).")
    s3_connect_timeout: float = option(S3Options.connect_timeout, feeds=S3Options,
                                       as_name="connect_timeout", check=positive_seconds,
                                       help="S3 connect timeout, seconds.")
    s3_request_timeout: float = option(S3Options.request_timeout, feeds=S3Options,
                                       as_name="request_timeout", check=positive_seconds,
                                       help="S3 request timeout, seconds.")
    s3_lock_lease: float = option(600.0, check=positive_seconds, help=(
        "An S3 lock not refreshed for this many seconds is stale."))
    inventory_prefix: str = option("", default_help="whole bucket, ids = keys", help=(
        "S3 Inventory INPUT: only keys under this prefix, image ids relative to it (the ids "
        "labeling s3://BUCKET/PREFIX gives)."))

    def __post_init__(self) -> None:
        check_options(self)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # What each stage is told (run.label builds each once and passes it down).
    def read_limits(self) -> ReadLimits:
        return narrow(self, ReadLimits)

    def device_request(self) -> DeviceRequest:
        return narrow(self, DeviceRequest)

    def model_request(self) -> ModelRequest:
        return narrow(self, ModelRequest)

    def s3_options(self) -> S3Options:
        return narrow(self, S3Options)


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config file; keys may sit at the top level or under a [label] table."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))  # a FIFO (`<(...)`) is read too
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a directory; name a .toml file") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not valid UTF-8 (byte {e.start}), as TOML must "
                          f"be") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
    if not isinstance(data.get("label", {}), dict):
        raise ConfigError(f"config file {p}: label must be a table ([label]), not "
                          f"{type(data['label']).__name__}")
    table = dict(data.pop("label", {}))
    table.update(data)
    return {k.replace("-", "_"): v for k, v in table.items()}


def build_config(
    file_values: Mapping[str, Any] | None = None,
    flag_values: Mapping[str, Any] | None = None,
    source: str = "config",
    config_type: type[RunConfig] = RunConfig,
) -> RunConfig:
    """Merge defaults < file values < flags (flags that are None were not given)."""
    keys = {f.name for f in dataclasses.fields(config_type)}
    merged: dict[str, Any] = {}
    for values, where in ((file_values or {}, source), (flag_values or {}, "flags")):
        unknown = sorted(set(values) - keys)
        if unknown:
            raise ConfigError(f"unknown config key(s) in {where}: {', '.join(unknown)}")
        merged.update({k: v for k, v in values.items() if v is not None})
    try:
        return config_type(**merged)
    except TypeError as e:  # wrong value types from TOML
        raise ConfigError(str(e)) from e
