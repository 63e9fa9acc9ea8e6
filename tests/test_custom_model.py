"""Custom models: label files, .keras files and SavedModel directories, and their errors."""
import hashlib
import json

import numpy as np
import pytest

from pipeline.config import RunConfig
from pipeline.exitcodes import ConfigError
from pipeline.types import ModelRequest
from pipeline.models import get
from pipeline.models.custom import custom_preprocess, directory_sha256, read_labels
from pipeline.models.imagenet import imagenet_labels
from pipeline.reader import ImageReader
from pipeline.sources import iter_refs

from conftest import reader_input


def small_classifier(size=64, classes=3, seed=0):
    """A tiny convnet ending in softmax, as a team's fine-tuned model would."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "pets.keras"
    small_classifier().save(path)
    return path


@pytest.fixture(scope="module")
def labels_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "pets.txt"
    path.write_text("cat\ndog\nbird\n\n")
    return path


def custom_request(path, **kw):
    return ModelRequest(str(path), **{"preprocess": "tf", **kw})


@pytest.mark.parametrize("content, ids, names", [
    ("cat\ndog\nbird\n", ["cat", "dog", "bird"], ["cat", "dog", "bird"]),
    ("  cat \r\ndog\r\nbird\r\n\r\n\n", ["cat", "dog", "bird"], ["cat", "dog", "bird"]),
])
def test_text_labels(tmp_path, content, ids, names):
    (tmp_path / "l.txt").write_bytes(content.encode())
    labels = read_labels(str(tmp_path / "l.txt"))
    assert list(labels.ids) == ids and list(labels.names) == names


@pytest.mark.parametrize("data, ids, names", [
    (["cat", "dog"], ["cat", "dog"], ["cat", "dog"]),
    ({"1": "dog", "0": "cat"}, ["cat", "dog"], ["cat", "dog"]),
    ({"0": ["c01", "cat"], "1": ["c02", "dog"]}, ["c01", "c02"], ["cat", "dog"]),
])
def test_json_labels(tmp_path, data, ids, names):
    (tmp_path / "l.json").write_text(json.dumps(data))
    labels = read_labels(str(tmp_path / "l.json"))
    assert list(labels.ids) == ids and list(labels.names) == names


def test_keras_class_index_file_reads_as_the_imagenet_labels(tmp_path):
    labels = imagenet_labels()
    index = {str(i): [labels.ids[i], labels.names[i]] for i in range(1000)}
    (tmp_path / "imagenet_class_index.json").write_text(json.dumps(index))
    assert read_labels(str(tmp_path / "imagenet_class_index.json")) == labels


@pytest.mark.parametrize("name, content, message", [
    ("gap.txt", "cat\n\ndog\n", "line 2 is empty"),
    ("empty.txt", "\n\n", "no labels"),
    ("dup.txt", "cat\ndog\ncat\n", "'cat' more than once"),
    ("bad.json", "[\"cat\", ", "not valid JSON"),
    ("hole.json", '{"0": "cat", "2": "dog"}', "0..1 with none missing"),
    ("keys.json", '{"zero": "cat"}', "class indices"),
    ("kind.json", '"cat"', "expected a JSON list or object"),
    ("item.json", '[["c01", "cat", "extra"]]', "class 0 must be a name or an [id, name] pair"),
])
def test_bad_label_files_are_config_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_labels(str(tmp_path / name))


def test_missing_label_file(tmp_path):
    with pytest.raises(ConfigError, match="--labels file not found"):
        read_labels(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("mode", ["tf", "torch", "caffe"])
def test_presets_equal_keras_preprocess_input_modes(mode):
    from keras.applications import imagenet_utils

    pre = custom_preprocess(mode, 32)
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8)
    expected = imagenet_utils.preprocess_input(pixels.astype(np.float32), mode=mode)
    np.testing.assert_allclose(reader_input(pixels, pre), expected, rtol=1e-5, atol=1e-4)
    assert pre.crop_fraction == 0.875


def test_lite_and_raw_presets():
    lite = custom_preprocess("lite", 240)
    assert lite.crop_fraction == 240 / 272 and lite.resize == "bicubic" and lite.mean == (127.0,) * 3
    raw = custom_preprocess("raw", 64)
    assert raw.mean == (0.0,) * 3 and raw.std == (1.0,) * 3
    with pytest.raises(ConfigError, match="preprocess must be one of"):
        custom_preprocess("imagenet", 64)


def test_keras_file_spec(keras_file, labels_txt, photos_dir):
    spec = get(custom_request(str(keras_file), labels=str(labels_txt)))
    assert spec.name == "pets.keras" and spec.input_size == 64
    assert list(spec.labels.ids) == ["cat", "dog", "bird"]
    assert spec.weights_sha256 == hashlib.sha256(keras_file.read_bytes()).hexdigest()
    batch = next(iter(ImageReader(iter_refs(str(photos_dir)), spec.preprocess, 8)))
    probs = np.asarray(spec.load_keras()(batch.images, training=False))
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_saved_model_directory_spec(tmp_path, labels_txt, photos_dir):
    model = small_classifier(48, seed=4)
    model.export(str(tmp_path / "pets_sm"), verbose=False)
    spec = get(custom_request(str(tmp_path / "pets_sm") + "/", labels=str(labels_txt), preprocess="raw"))
    assert spec.name == "pets_sm" and spec.input_size == 48
    batch = next(iter(ImageReader(iter_refs(str(photos_dir)), spec.preprocess, 8)))
    np.testing.assert_allclose(spec.load_keras()(batch.images), model(batch.images), rtol=1e-5, atol=1e-6)
    before = spec.weights_sha256
    with open(tmp_path / "pets_sm" / "fingerprint.pb", "ab") as f:
        f.write(b"\0")
    changed = get(custom_request(str(tmp_path / "pets_sm"), labels=str(labels_txt), preprocess="raw"))
    assert changed.weights_sha256 != before


def test_directory_checksum_covers_every_file_by_relative_path(tmp_path):
    """The documented format, computed here with hashlib: each file's relative path, NUL, its
    sha256 and a newline, a directory's files before its subdirectories, names sorted."""
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "b.pb").write_bytes(b"graph")
    (tmp_path / "m" / "a.txt").write_bytes(b"x")
    (tmp_path / "m" / "sub" / "0.data").write_bytes(b"weights")
    file_hash = lambda data: hashlib.sha256(data).hexdigest().encode()  # noqa: E731
    expected = hashlib.sha256(b"a.txt\0" + file_hash(b"x") + b"\n" + b"b.pb\0" + file_hash(b"graph")
                              + b"\n" + b"sub/0.data\0" + file_hash(b"weights") + b"\n").hexdigest()
    assert directory_sha256(str(tmp_path / "m")) == expected


def test_input_size_comes_from_the_model_or_the_flag(tmp_path, labels_txt):
    import keras

    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs))
    keras.Model(inputs, outputs).save(tmp_path / "any.keras")
    with pytest.raises(ConfigError, match="pass --input-size"):
        get(custom_request(str(tmp_path / "any.keras"), labels=str(labels_txt)))
    spec = get(custom_request(str(tmp_path / "any.keras"), labels=str(labels_txt), input_size=96))
    assert spec.input_size == 96


@pytest.mark.parametrize("change, message", [
    (dict(labels="{four}"), "has 4 labels but .* outputs 3 scores"),
    (dict(labels=None), "needs --labels"),
    (dict(preprocess=None), "needs --preprocess"),
    (dict(input_size=128), "--input-size 128 but .* takes 64x64"),
    (dict(weights="{weights}"), "--weights applies to registry models"),
])
def test_custom_model_config_errors(tmp_path, keras_file, labels_txt, change, message):
    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    (tmp_path / "w.h5").write_bytes(b"x")
    paths = {"four": tmp_path / "four.txt", "weights": tmp_path / "w.h5"}
    values = dict(labels=str(labels_txt), preprocess="tf")
    values.update({k: v.format(**paths) if isinstance(v, str) else v for k, v in change.items()})
    with pytest.raises(ConfigError, match=message):
        get(ModelRequest(str(keras_file), **values))


def test_bad_model_paths(tmp_path, labels_txt):
    cfg = dict(labels=str(labels_txt), preprocess="tf")
    with pytest.raises(ConfigError, match="model file not found"):
        get(ModelRequest(str(tmp_path / "missing.keras"), **cfg))
    (tmp_path / "notes").mkdir()
    with pytest.raises(ConfigError, match="without saved_model.pb"):
        get(ModelRequest(str(tmp_path / "notes"), **cfg))
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(ConfigError, match=".keras file or a SavedModel"):
        get(ModelRequest(str(tmp_path / "model.onnx"), **cfg))
    (tmp_path / "broken.keras").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ConfigError, match="cannot load .* as a Keras model"):
        get(ModelRequest(str(tmp_path / "broken.keras"), **cfg))


def test_custom_options_with_a_registry_model_are_an_error():
    with pytest.raises(ConfigError, match="--labels, --preprocess only apply to a custom model"):
        get(ModelRequest("efficientnet_lite0", labels="x.txt", preprocess="tf"))
    with pytest.raises(ConfigError, match="preprocess must be one of"):
        RunConfig(preprocess="imagenet")
    with pytest.raises(ConfigError, match="input_size"):
        RunConfig(input_size=0)
