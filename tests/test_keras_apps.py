"""keras.applications networks: Keras' own preprocess_input, weight file names and architecture
(EfficientNet's "imagenet" rescaling included) against what pipeline builds, on real photos."""
import gc
import hashlib
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.exitcodes import ConfigError
from pipeline.models import get, keras_apps
from pipeline.models.imagenet import imagenet_labels
from pipeline.models.keras_apps import APPS, BY_NAME
from pipeline.models.base import ModelUnavailable
from pipeline.models.registry import list_entries
from pipeline.types import ModelRequest, Preprocess
from pipeline.reader import ImageReader
from pipeline.runtime import KerasPredictor, top_k
from pipeline.sources import iter_refs

from conftest import reader_input
from test_cli import SOCKET_BLOCKER

# Built with random weights on every CI run; the rest of the registry runs under -m slow.
CI_SUBSET = ("mobilenet_v2", "resnet50", "efficientnet_b0")
KERAS_CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"  # keras/src/applications/imagenet_utils.py


def keras_applications():
    import keras

    return keras.applications


@pytest.mark.parametrize("app", APPS, ids=lambda a: a.name)
def test_normalization_equals_keras_preprocess_input(app):
    pre = app.preprocess()
    pixels = np.random.default_rng(0).integers(0, 256, (pre.size, pre.size, 3), np.uint8)
    ours = reader_input(pixels, pre)  # the reader's own decode step; resize is 1:1 here
    theirs = getattr(keras_applications(), app.module).preprocess_input(pixels.astype(np.float32))
    np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-5, atol=1e-4)


def test_every_app_is_a_keras_builder_with_its_true_input_size():
    apps = keras_applications()
    assert len({a.name for a in APPS}) == len(APPS) == 40
    for app in APPS:
        assert callable(getattr(apps, app.builder)), app.builder
    sizes = {a.name: a.size for a in APPS}
    assert sizes["inception_resnet_v2"] == sizes["xception"] == 299 and sizes["nasnet_large"] == 331
    assert [sizes[f"efficientnet_b{i}"] for i in range(8)] == [224, 240, 260, 300, 380, 456, 528, 600]
    assert sizes["efficientnetv2_s"] == 384 and sizes["efficientnetv2_l"] == 480


def test_crop_policies_follow_each_family_recipe():
    assert BY_NAME["inception_resnet_v2"].preprocess().crop_fraction == 0.875
    b3 = BY_NAME["efficientnet_b3"].preprocess()
    assert b3.crop_fraction == pytest.approx(300 / 332) and b3.resize == "bicubic"
    assert BY_NAME["efficientnetv2_s"].preprocess().crop_fraction is None  # >= 320 px: no crop
    assert BY_NAME["convnext_tiny"].preprocess().resize == "bicubic"
    assert BY_NAME["resnet50"].preprocess().bgr


def informative(model, images, seed=0):
    """Random weights whose outputs depend on the image: each BatchNormalization's statistics are
    measured on a real batch (so activations neither vanish nor explode, as they do with the
    stock init), and a random classifier separates the classes clearly enough that float
    rounding cannot reorder them."""
    import keras
    import tensorflow as tf

    norms = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    momentums = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0  # moving statistics := this batch's
    tf.function(lambda x: model(x, training=True))(images)  # a graph: eager takes ~4 GB at 600 px
    for layer, momentum in zip(norms, momentums):
        layer.momentum = momentum
    classifier = next(layer for layer in reversed(model.layers) if layer.weights)
    rng = np.random.default_rng(seed)
    kernel, bias = classifier.get_weights()
    classifier.set_weights([rng.normal(0, 3 / np.sqrt(kernel.shape[-2]), kernel.shape).astype(np.float32),
                            rng.normal(0, 1.0, bias.shape).astype(np.float32)])
    return model


def all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from all_layers(layer)


def first_batch(photos_dir, pre: Preprocess, n: int = 5):
    """The first n photos (up to 5), read and preprocessed by the reader, as one batch."""
    refs = itertools.islice(iter_refs(str(photos_dir)), n)
    return next(iter(ImageReader(refs, pre, 8)))


def keras_imagenet_build(app, weights_path, monkeypatch):
    """What keras.applications.<builder>(weights="imagenet") builds, fed our file instead of a
    download; returns the model and the file names Keras asked for."""
    import keras.src.utils.file_utils as file_utils

    requested = []

    def offline_get_file(fname=None, origin=None, **kwargs):
        requested.append(fname)
        return str(weights_path)

    with monkeypatch.context() as m:
        m.setattr(file_utils, "get_file", offline_get_file)
        model = getattr(keras_applications(), app.builder)(weights="imagenet")
    return model, requested


def save_like_keras_downloads(model, path):
    """Weights in the legacy HDF5 layout of the files Keras downloads into ~/.keras/models/."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def check_against_keras(name, tmp_path, monkeypatch, photos_dir):
    """Keras' own ImageNet build (random weights made informative on a real batch, fed Keras' own
    preprocess_input) against our spec loading the same weights file and reading the same photos
    through our reader."""
    app = BY_NAME[name]
    photos = 5 if app.size <= 300 else 2
    keras_apps.build(app).save_weights(tmp_path / "untrained.weights.h5")
    reference, requested = keras_imagenet_build(app, tmp_path / "untrained.weights.h5", monkeypatch)
    assert requested == [app.weights_file]  # the file name Keras downloads and caches
    raw_crop = Preprocess(app.size, app.crop_fraction, app.resize, (0, 0, 0), (1, 1, 1))
    preprocess_input = getattr(keras_applications(), app.module).preprocess_input
    keras_inputs = preprocess_input(first_batch(photos_dir, raw_crop, photos).images.copy())
    informative(reference, keras_inputs[:2])  # BatchNorm statistics need few images
    expected = reference.predict(keras_inputs, batch_size=1, verbose=0)
    weights = save_like_keras_downloads(reference, tmp_path / app.weights_file)
    del reference

    spec = get(ModelRequest(name, weights=str(weights), cache_dir=str(tmp_path)))
    assert spec.input_size == app.size and spec.labels == imagenet_labels()
    assert spec.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    ours = spec.load_keras()
    assert ours.output_shape == (None, 1000)
    batch = first_batch(photos_dir, spec.preprocess, photos)
    assert batch.images.shape == (photos, app.size, app.size, 3) and not batch.errors
    probs = KerasPredictor(ours).predict(batch.images)  # what the engine calls

    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    assert np.ptp(probs, axis=0).max() > 1e-3  # the scores depend on the image
    np.testing.assert_allclose(probs, expected, rtol=2e-3, atol=1e-5)
    idx, scores = top_k(probs, 5)
    ref_idx, _ = top_k(expected, 5)
    np.testing.assert_array_equal(idx, ref_idx)


@pytest.fixture
def fresh_keras():
    """Free each network's memory before the next one (the whole registry is ~2.5 G parameters)."""
    yield
    import keras

    keras.backend.clear_session(free_memory=True)
    gc.collect()


@pytest.mark.parametrize("name", [
    pytest.param(a.name, marks=() if a.name in CI_SUBSET else pytest.mark.slow) for a in APPS
])
def test_registry_network_matches_keras_imagenet_build(name, tmp_path, monkeypatch, photos_dir, fresh_keras):
    check_against_keras(name, tmp_path, monkeypatch, photos_dir)


def test_missing_weights_name_both_remedies_and_the_offline_default(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    entry = next(e for e in list_entries() if e.name == "resnet50")
    assert entry.offline(ModelRequest()) == "needs download"
    with pytest.raises(ModelUnavailable) as err:
        get(ModelRequest("resnet50"))
    message = str(err.value)
    assert str(tmp_path / "keras" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5") in message
    assert "--weights FILE" in message and "efficientnet_lite0" in message
    assert isinstance(err.value, ConfigError)  # exit code 2


def test_weights_come_from_the_keras_cache(tmp_path, monkeypatch, photos_dir):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    app = BY_NAME["mobilenet_v2"]
    cached = tmp_path / "keras" / "models" / app.weights_file
    cached.parent.mkdir(parents=True)
    model = informative(keras_apps.build(app), first_batch(photos_dir, app.preprocess()).images, seed=3)
    save_like_keras_downloads(model, cached)
    entry = next(e for e in list_entries() if e.name == "mobilenet_v2")
    assert entry.offline(ModelRequest()) == "cached"
    spec = get(ModelRequest("mobilenet_v2"))
    assert spec.weights_source == f"keras cache {cached}"
    assert spec.weights_sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()
    batch = first_batch(photos_dir, spec.preprocess)
    np.testing.assert_allclose(spec.load_keras()(batch.images), model(batch.images), rtol=1e-5, atol=1e-6)


def test_a_weights_file_that_does_not_fit_is_a_config_error(tmp_path):
    wrong = tmp_path / "mobilenet.weights.h5"
    keras_apps.build(BY_NAME["mobilenet"]).save_weights(wrong)
    spec = get(ModelRequest("mobilenet_v2", weights=str(wrong)))
    with pytest.raises(ConfigError, match="does not hold mobilenet_v2"):
        spec.load_keras()
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="must be a Keras weights file"):
        get(ModelRequest("mobilenet_v2", weights=str(tmp_path / "weights.bin")))


def keras_cache_with_class_index(root):
    """A Keras cache holding imagenet_class_index.json written from our labels, so Keras'
    decode_predictions reads it instead of downloading (it checks the file's md5)."""
    labels = imagenet_labels()
    text = json.dumps({str(i): [labels.ids[i], labels.names[i]] for i in range(len(labels))})
    assert hashlib.md5(text.encode()).hexdigest() == KERAS_CLASS_INDEX_MD5  # byte-identical
    (root / "models").mkdir(parents=True)
    (root / "models" / "imagenet_class_index.json").write_text(text)
    return root


DECODE_SCRIPT = """
import json, sys
import numpy as np
from keras.applications.imagenet_utils import decode_predictions
decoded = decode_predictions(np.load(sys.argv[1]), top=int(sys.argv[2]))
print(json.dumps([[[wnid, name, float(score)] for wnid, name, score in row] for row in decoded]))
"""


def tie_rows() -> np.ndarray:
    rng = np.random.default_rng(7)
    rows = [np.full(1000, 1e-3, np.float32)]  # everything tied
    boundary = rng.dirichlet(np.ones(1000)).astype(np.float32) * 0.1
    boundary[[3, 500, 999, 42, 7]] = [0.3, 0.2, 0.1, 0.1, 0.1]  # a 3-way tie across the cut
    rows.append(boundary)
    coarse = np.round(rng.dirichlet(np.ones(1000)) * 50, 1).astype(np.float32) / 50  # many ties
    rows.append(coarse)
    rows.append(np.zeros(1000, np.float32))
    return np.stack(rows)


def test_top_k_equals_keras_decode_predictions(tmp_path, photos_dir, cli_env):
    spec = get(ModelRequest("efficientnet_lite0", cache_dir=cli_env["XDG_CACHE_HOME"] + "/pipeline"))
    real = spec.load_keras()(first_batch(photos_dir, spec.preprocess).images, training=False)
    random_rows = np.random.default_rng(1).dirichlet(np.ones(1000) * 0.1, 4).astype(np.float32)
    scores = np.concatenate([np.asarray(real), random_rows, tie_rows()])
    np.save(tmp_path / "scores.npy", scores)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SOCKET_BLOCKER)  # a download would fail
    env = dict(cli_env, KERAS_HOME=str(keras_cache_with_class_index(tmp_path / "keras")),
               PYTHONPATH=str(tmp_path / "site"), NETLOG=str(tmp_path / "net.log"))
    labels = imagenet_labels()
    for k in (1, 5, 10):
        proc = subprocess.run([sys.executable, "-c", DECODE_SCRIPT, str(tmp_path / "scores.npy"), str(k)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        keras_rows = json.loads(proc.stdout.strip().splitlines()[-1])
        idx, top_scores = top_k(scores, k)
        ours = [[[labels.ids[i], labels.names[i], float(s)] for i, s in zip(r, sr)]
                for r, sr in zip(idx, top_scores)]
        assert ours == keras_rows
    assert not (tmp_path / "net.log").exists()
