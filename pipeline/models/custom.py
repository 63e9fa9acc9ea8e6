"""A custom model: a `.keras` file or a SavedModel directory, with the user's own class names.

The model is loaded when its spec is made, so a wrong file, a label file that does not match the
model's outputs, or a missing option is a usage error before OUTPUT is touched. Scores are the
model's outputs as they are: a model should end in softmax for them to be probabilities.
"""
from __future__ import annotations

import hashlib
import json
import os

from ..exitcodes import ConfigError
from ..types import PREPROCESS_CHOICES, Labels, ModelRequest, ModelSpec, Preprocess
from .base import file_sha256, lite_preprocess, normalization

_CENTER_CROP = 0.875  # the usual ImageNet eval crop, for the keras-style presets


def looks_like_path(name: str) -> bool:
    """A --model value that names a file or directory rather than a registry entry."""
    return (name.endswith(".keras") or os.sep in name or bool(os.altsep and os.altsep in name)
            or os.path.exists(name))


def make_spec(path: str, request: ModelRequest) -> ModelSpec:
    path = path.rstrip("/") or path
    kind = _model_kind(path)
    if request.weights:
        raise ConfigError("--weights applies to registry models; a custom model carries its own weights")
    if request.labels is None:
        raise ConfigError("a custom model needs --labels FILE: a .txt with one class name per line, "
                          "or .json (a list, or {index: name} / {index: [id, name]})")
    if request.preprocess is None:
        raise ConfigError(f"a custom model needs --preprocess, the normalization it was trained "
                          f"with: {', '.join(PREPROCESS_CHOICES)}")
    labels = read_labels(request.labels)
    model = _load(path, kind)
    size = _input_size(model, request.input_size, path)
    outputs = model.output_shape[-1]
    if outputs != len(labels):
        raise ConfigError(f"{request.labels} has {len(labels)} labels but {path} outputs {outputs} scores")
    sha = file_sha256(path) if kind == "keras" else directory_sha256(path)
    _checked[(path, kind)] = model  # the first load_keras() takes it instead of loading again
    return ModelSpec(os.path.basename(path), custom_preprocess(request.preprocess, size), labels,
                     f"custom {os.path.abspath(path)}", sha, f"{__name__}:load", (path, kind))


def custom_preprocess(kind: str, size: int) -> Preprocess:
    """--preprocess NAME for a size x size model: 0.875 center crop, bilinear, that normalization
    (lite: EfficientNet-Lite's own crop, bicubic)."""
    if kind not in PREPROCESS_CHOICES:
        raise ConfigError(f"preprocess must be one of {', '.join(PREPROCESS_CHOICES)}; got {kind!r}")
    if kind == "lite":
        return lite_preprocess(size)
    return Preprocess(size, _CENTER_CROP, "bilinear", **normalization(kind))


def _model_kind(path: str) -> str:
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise ConfigError(f"{path} is a directory without saved_model.pb, so not a SavedModel")
        return "savedmodel"
    if not os.path.exists(path):
        raise ConfigError(f"model file not found: {path}")
    if not path.endswith(".keras"):
        raise ConfigError(f"{path}: a custom model is a .keras file or a SavedModel directory")
    return "keras"


# ---- labels ---------------------------------------------------------------------------------

def read_labels(path: str) -> Labels:
    """Class i's id and name from a .txt (a name per line) or .json label file."""
    if not os.path.isfile(path):
        raise ConfigError(f"--labels file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read --labels {path}: {e}") from e
    pairs = _json_labels(text, path) if path.lower().endswith(".json") else _text_labels(text, path)
    if not pairs:
        raise ConfigError(f"--labels {path} lists no labels")
    ids = [i for i, _ in pairs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"--labels {path} lists {duplicates[0]!r} more than once")
    return Labels(tuple(ids), tuple(n for _, n in pairs))


def _text_labels(text: str, path: str) -> list[tuple[str, str]]:
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line:
            raise ConfigError(f"--labels {path}: line {number} is empty (one label per line)")
    return [(line, line) for line in lines]


def _json_labels(text: str, path: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--labels {path} is not valid JSON: {e}") from e
    if isinstance(data, list):
        return [_json_label(value, str(i), path) for i, value in enumerate(data)]
    if isinstance(data, dict):
        try:
            indexed = {int(k): v for k, v in data.items()}
        except ValueError:
            raise ConfigError(f"--labels {path}: object keys must be class indices 0..n-1") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise ConfigError(f"--labels {path}: object keys must be the class indices 0..{len(indexed) - 1}"
                              " with none missing")
        return [_json_label(indexed[i], str(i), path) for i in range(len(indexed))]
    raise ConfigError(f"--labels {path}: expected a JSON list or object, got {type(data).__name__}")


def _json_label(value, index: str, path: str) -> tuple[str, str]:
    if isinstance(value, str) and value.strip():
        return value.strip(), value.strip()
    if (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) and v.strip() for v in value)):
        return value[0].strip(), value[1].strip()
    raise ConfigError(f"--labels {path}: class {index} must be a name or an [id, name] pair, got {value!r}")


# ---- loading --------------------------------------------------------------------------------

# Models make_spec loaded to check them, not yet handed out: a spec's first load_keras() in
# this process takes its model from here (in another process, e.g. a Ray actor, it loads).
_checked: dict[tuple[str, str], object] = {}


def load(path: str, kind: str):
    """The custom model as a Keras model (a ModelSpec's loader: called by name)."""
    return _checked.pop((path, kind), None) or _load(path, kind)


def _load(path: str, kind: str):
    return _load_keras_file(path) if kind == "keras" else _load_saved_model(path)


def _load_keras_file(path: str):
    import zipfile

    import keras

    if not zipfile.is_zipfile(path):  # Keras would say "File not found"
        raise ConfigError(f"cannot load {path} as a Keras model: it is not a .keras file (a zip "
                          f"archive)")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # zip, h5py and deserialization errors of every kind
        raise ConfigError(f"cannot load {path} as a Keras model: {_first_line(e)}") from e


def _load_saved_model(path: str):
    """A SavedModel as a one-input Keras model (through keras.layers.TFSMLayer)."""
    import keras

    layer = _tfsm_layer(path)
    shape = _endpoint_input_shape(layer.call_endpoint_fn, path)
    inputs = keras.Input(tuple(shape[1:]), name="image")
    outputs = layer(inputs)
    if isinstance(outputs, dict):
        if len(outputs) != 1:
            raise ConfigError(f"SavedModel {path} returns {len(outputs)} outputs ({', '.join(outputs)});"
                              " pipeline needs one score vector")
        outputs = next(iter(outputs.values()))
    return keras.Model(inputs, outputs, name=os.path.basename(path))


def _tfsm_layer(path: str):
    """The 'serve' endpoint (what Keras' model.export writes), else 'serving_default'."""
    import keras

    for endpoint in ("serve", "serving_default"):
        try:
            return keras.layers.TFSMLayer(path, call_endpoint=endpoint)
        except ValueError as e:
            if "endpoint" in str(e):
                continue  # try the next name
            raise ConfigError(f"cannot load SavedModel {path}: {_first_line(e)}") from e
        except Exception as e:
            raise ConfigError(f"cannot load SavedModel {path}: {_first_line(e)}") from e
    raise ConfigError(f"SavedModel {path} has no 'serve' or 'serving_default' endpoint")


def _endpoint_input_shape(fn, path: str) -> tuple:
    import tensorflow as tf

    signature = getattr(fn, "input_signature", None)
    if signature is None:
        args, kwargs = fn.structured_input_signature
        signature = (*args, *kwargs.values())
    specs = tf.nest.flatten(signature)
    if len(specs) != 1 or specs[0].shape.rank != 4:
        raise ConfigError(f"SavedModel {path} must take one [batch, height, width, 3] image input")
    return tuple(specs[0].shape)


def _input_size(model, requested: int | None, path: str) -> int:
    """The square input side: the model's own, else --input-size (which must agree with it)."""
    shape = model.input_shape
    if isinstance(shape, list) or len(shape) != 4 or shape[-1] not in (3, None):
        raise ConfigError(f"{path} must take one [batch, height, width, 3] image input; its input is {shape}")
    height, width = shape[1], shape[2]
    if height is not None and width is not None and height != width:
        raise ConfigError(f"{path} takes {height}x{width} images; pipeline feeds square ones")
    fixed = height or width
    if fixed and requested and requested != fixed:
        raise ConfigError(f"--input-size {requested} but {path} takes {fixed}x{fixed} images")
    size = fixed or requested
    if not size:
        raise ConfigError(f"{path} accepts any image size: pass --input-size N")
    return int(size)


def directory_sha256(path: str) -> str:
    """One checksum for a SavedModel: each file's relative path and sha256, in sorted order."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0" + file_sha256(full).encode() + b"\n")
    return h.hexdigest()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
