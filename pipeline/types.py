"""Value types every stage shares (and `printable`, how their uris and messages are shown to
people). A leaf: imports nothing of the project, so any layer can use
them without loading the layers above (and Ray can pickle all of them).

The narrow option types (ReadLimits, DeviceRequest, ModelRequest, S3Options) are what each
stage receives instead of the whole RunConfig; `run.label` builds them once from it.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import asdict, dataclass, field


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pipeline")


# ---- inputs, errors -------------------------------------------------------------------------

def printable(text: str) -> str:
    """`text` as valid UTF-8 for people (uri, messages): bytes of a non-UTF-8 file name
    (surrogate escapes) as \\xNN. Not a key: a name containing the text `\\xe9` looks the same."""
    if text.isascii():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


NULL_INT = -(1 << 63)  # an unknown file_size / mtime in int64 columns (numpy arrays of refs)
_INT64_MAX = (1 << 63) - 1
_NS_PER = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}


def mtime_ns_or_none(ns: int) -> int | None:
    """`ns` if int64 nanoseconds hold it (1677-09-21 to 2262-04-11: the unit of listings and of
    the done set), else None: a file dated outside that range is labeled with mtime null."""
    return ns if NULL_INT < ns <= _INT64_MAX else None


def timestamps_ns(column):
    """A pyarrow timestamp array as an int64 numpy array of nanoseconds, NULL_INT where it is
    null or outside what int64 nanoseconds hold (see mtime_ns_or_none)."""
    import numpy as np
    import pyarrow as pa

    per = _NS_PER[column.type.unit]
    raw = column.cast(pa.int64()).fill_null(NULL_INT).to_numpy()
    limit = _INT64_MAX // per
    fits = (raw >= -limit) & (raw <= limit)  # -limit > NULL_INT: a null does not fit
    return np.where(fits, np.where(fits, raw, 0) * per, NULL_INT)


@dataclass(frozen=True)
class ImageRef:
    """One input: `image_id` is the stable key (path relative to INPUT, or the manifest id)."""

    image_id: str
    uri: str
    file_size: int | None  # None: nothing to read (missing, broken link, FIFO, device, directory)
    mtime_ns: int | None
    # A manifest entry that names no file (an empty path, a NUL byte): why. Such a ref is never
    # read; it becomes an `invalid_entry` error row.
    entry_error: str | None = None


@dataclass(frozen=True)
class ErrorRecord:
    """A per-image failure; it becomes a row with status 'error' like a prediction would."""

    ref: ImageRef
    kind: str
    message: str
    width: int | None = None
    height: int | None = None
    content_sha256: str | None = None  # of the bytes read, when any were (e.g. a corrupt file)


# ---- models ---------------------------------------------------------------------------------

# How a custom model wants its pixels: keras.applications' preprocess_input modes, plus
# EfficientNet-Lite's and raw 0..255 (models that normalize inside).
PREPROCESS_CHOICES = ("tf", "torch", "caffe", "lite", "raw")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes model input, as the model was evaluated.

    Center square crop of `crop_fraction` of the shorter side, resize to size x size with
    `resize`, then (x - mean) / std per RGB channel (channels flipped to BGR first if `bgr`).
    """

    size: int
    crop_fraction: float | None = 0.875  # None: the whole image, uncropped
    resize: str = "bicubic"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    bgr: bool = False

    def describe(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Labels:
    """Output index i -> (ids[i], names[i])."""

    ids: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: everything a run records about it, and how to build its Keras model.

    `loader` names a function ("package.module:function") that `load_keras` calls with
    `loader_args`, so a spec is plain data: it pickles to a Ray actor, which builds the model
    there without resolving the registry again.
    """

    name: str
    preprocess: Preprocess
    labels: Labels
    weights_source: str
    weights_sha256: str
    loader: str
    loader_args: tuple = ()
    # --embeddings: the width of the pooled features the runtime returns too (None: labels only)
    embedding_width: int | None = None

    @property
    def input_size(self) -> int:
        return self.preprocess.size

    def load_keras(self):
        """The keras.Model giving class probabilities (built on each call)."""
        module, _, function = self.loader.partition(":")
        return getattr(importlib.import_module(module), function)(*self.loader_args)


# ---- what each stage is told ----------------------------------------------------------------

@dataclass(frozen=True)
class ReadLimits:
    """The reader's bounds on one image (larger ones become too_large error rows), and whether
    a JPEG much larger than the model input decodes at reduced scale (libjpeg DCT scaling)."""

    max_pixels: int = 90_000_000
    max_file_bytes: int = 512 * 2**20
    scaled_decode: bool = True


@dataclass(frozen=True)
class DeviceRequest:
    """What the runtime is asked for; devices.plan turns it into a Plan for this host."""

    runtime: str = "auto"  # auto | keras | litert
    precision: str = "auto"  # auto | float32 | float16 | bfloat16 | int8 (litert only)
    batch_size: int | None = None  # None: per device (devices.plan)
    cache_dir: str = field(default_factory=default_cache_dir)  # the LiteRT flatbuffer's cache
    feed: str = "auto"  # auto | uint8 | float32: what the reader hands the model (devices.plan)


@dataclass(frozen=True)
class Feed:
    """How the reader hands batches to a predictor (the predictor says what it takes)."""

    dtype: str = "float32"  # float32: model-ready input; uint8: resized pixels, normalized later
    tensors: bool = False  # TensorFlow tensors straight from tf.data instead of numpy arrays
    device: str | None = None  # with tensors: batches are prefetched onto this device


@dataclass(frozen=True)
class ModelRequest:
    """What `models.get` resolves: a registry name or a custom model path, plus its options."""

    model: str = "efficientnet_lite0"
    weights: str | None = None
    labels: str | None = None  # custom model only
    input_size: int | None = None  # custom model only
    preprocess: str | None = None  # custom model only
    cache_dir: str = field(default_factory=default_cache_dir)  # converted weights' cache


@dataclass(frozen=True)
class S3Options:
    """How to reach S3; passed to every place that touches an s3:// URI (also Ray tasks)."""

    endpoint: str | None = None  # e.g. http://127.0.0.1:9000; else AWS_ENDPOINT_URL; else AWS
    region: str | None = None  # else AWS_REGION / AWS_DEFAULT_REGION; else us-east-1
    max_attempts: int = 5  # per request, with exponential backoff (timeouts, 5xx, throttling)
    connect_timeout: float = 5.0
    request_timeout: float = 30.0

    @property
    def endpoint_url(self) -> str | None:
        return self.endpoint or os.environ.get("AWS_ENDPOINT_URL") or None

    @property
    def region_name(self) -> str:
        return (self.region or os.environ.get("AWS_REGION")
                or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
