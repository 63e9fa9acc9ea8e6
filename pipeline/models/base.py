"""What the model modules share: registry entries, normalizations and crops, weight checksums."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from ..exitcodes import ConfigError
from ..types import ModelRequest, ModelSpec, Preprocess


class ModelUnavailable(ConfigError):
    """The model's weights are not on this machine; the message names the remedies."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    input_size: int
    weights_source: str
    params_millions: float | None
    imagenet_top1: float | None
    offline: Callable[[ModelRequest], str]  # "embedded" / "cached" / "file" / "needs download"
    make_spec: Callable[[ModelRequest], ModelSpec]


# Per-channel (x - mean) / std on 0..255 RGB for each normalization a model can ask for. The
# first three are keras.applications.imagenet_utils.preprocess_input's modes (tests check them
# against it); "lite" is EfficientNet-Lite's; "raw" leaves pixels to a model that normalizes inside.
_NORMALIZATIONS: dict[str, dict[str, Any]] = {
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
