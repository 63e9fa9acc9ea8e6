"""End to end through the real CLI: Keras networks with --weights, custom models, the models
listing, and the embedded Lite models' accuracy on the shared ImageNet sample."""
import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.models.imagenet import imagenet_labels

from conftest import read_summary, run_cli
from test_cli import no_network_env
from test_custom_model import small_classifier
from test_keras_apps import first_batch, informative


@pytest.mark.slow
def test_inception_resnet_v2_with_weights_file_equals_keras_on_the_same_images(
        cli_env, photos_dir, tmp_path):
    import keras

    from pipeline.models.keras_apps import BY_NAME, build
    from pipeline.types import Preprocess
    from pipeline.runtime import top_k

    app = BY_NAME["inception_resnet_v2"]
    model = informative(build(app), first_batch(photos_dir, app.preprocess()).images)
    weights = tmp_path / "irv2.weights.h5"
    model.save_weights(weights)
    env = no_network_env(cli_env, tmp_path, KERAS_HOME=str(tmp_path / "empty-keras-home"))
    proc = run_cli(["label", photos_dir, tmp_path / "out", "--model", "inception_resnet_v2",
                    "--weights", weights, "--top-k", "5", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "net.log").exists()
    df = pd.read_parquet(tmp_path / "out").set_index("image_id").sort_index()
    assert len(df) == 5 and set(df.model) == {"inception_resnet_v2"}

    # Keras directly: the same crop and resize, then Keras' own preprocess_input.
    crop = Preprocess(app.size, app.crop_fraction, app.resize, (0, 0, 0), (1, 1, 1))
    batch = first_batch(photos_dir, crop)
    inputs = keras.applications.inception_resnet_v2.preprocess_input(batch.images.copy())
    idx, scores = top_k(np.asarray(model.predict(inputs, verbose=0)), 5)
    labels = imagenet_labels()
    for ref, row_idx, row_scores in zip(batch.refs, idx, scores):
        row = df.loc[ref.image_id]
        assert list(row.label_ids) == [labels.ids[i] for i in row_idx], ref.image_id
        np.testing.assert_allclose(row.scores, row_scores, rtol=1e-3, atol=1e-6)
    meta = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet"))).metadata
    assert meta[b"pipeline.weights_sha256"].decode() == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_keras_network_without_weights_says_what_to_do(cli, photos_dir, tmp_path):
    proc = cli("label", photos_dir, tmp_path / "out", "--model", "xception")
    assert proc.returncode == 2, proc.stderr
    assert "--weights FILE" in proc.stderr and "xception_weights_tf_dim_ordering_tf_kernels.h5" in proc.stderr
    assert "efficientnet_lite0" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing touched


def test_models_lists_the_zoo_and_what_is_offline_here(cli_env, tmp_path):
    home = tmp_path / "keras"
    (home / "models").mkdir(parents=True)
    (home / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5").write_bytes(b"h5")
    proc = run_cli(["models"], dict(cli_env, KERAS_HOME=str(home)))
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert len(rows) == 43  # 3 embedded Lite + 40 keras.applications networks
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        assert "embedded" in rows[name]  # ", converted" once a run converted it
    assert rows["resnet50"].split()[1:4] == ["224", "25.6M", "74.9%"] and rows["resnet50"].endswith("cached")
    assert rows["inception_resnet_v2"].split()[1:4] == ["299", "55.9M", "80.3%"]
    assert rows["inception_resnet_v2"].endswith("needs download")


@pytest.fixture(scope="module")
def pets(tmp_path_factory, photos_dir):
    """A 3-class Keras model, its label file and a folder of photos, labeled by the real CLI."""
    d = tmp_path_factory.mktemp("pets")
    model = small_classifier(64, 3, seed=2)
    model.save(d / "pets.keras")
    (d / "pets.txt").write_text("cat\ndog\nbird\n")
    return d, model


def test_custom_keras_model_labels_a_folder(cli, pets, photos_dir, tmp_path):
    d, model = pets
    proc = cli("label", photos_dir, tmp_path / "out", "--model", d / "pets.keras", "--labels",
               d / "pets.txt", "--preprocess", "torch", "--top-k", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    assert read_summary(proc)["labeled"] == 5
    df = pd.read_parquet(tmp_path / "out").set_index("image_id")
    assert set(df.model) == {"pets.keras"} and set(df.status) == {"ok"}
    assert all(sorted(ids) == ["bird", "cat", "dog"] for ids in df.label_ids)  # top-5 of 3 classes
    assert (df.label_id == df.label).all()

    from pipeline.models.custom import custom_preprocess

    batch = first_batch(photos_dir, custom_preprocess("torch", 64))
    probs = np.asarray(model(batch.images))
    for ref, p in zip(batch.refs, probs):
        row = df.loc[ref.image_id]
        assert row.label_id == ["cat", "dog", "bird"][int(np.argmax(p))]
        np.testing.assert_allclose(sorted(row.scores, reverse=True), sorted(p, reverse=True), rtol=1e-4)
    meta = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet"))).metadata
    assert meta[b"pipeline.weights_sha256"].decode() == hashlib.sha256((d / "pets.keras").read_bytes()).hexdigest()
    preprocessing = json.loads(meta[b"pipeline.preprocessing"])
    assert preprocessing["size"] == 64 and preprocessing["mean"] == pytest.approx([123.675, 116.28, 103.53])


@pytest.mark.parametrize("args, message", [
    (["--labels", "{four}", "--preprocess", "tf"], "has 4 labels but"),
    (["--labels", "{labels}", "--preprocess", "imagenet"], "preprocess must be one of"),
    (["--preprocess", "tf"], "needs --labels"),
    (["--labels", "{labels}"], "needs --preprocess"),
])
def test_custom_model_usage_errors_exit_2(cli, pets, photos_dir, tmp_path, args, message):
    d, _ = pets
    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    values = {"four": tmp_path / "four.txt", "labels": d / "pets.txt"}
    proc = cli("label", photos_dir, tmp_path / "out", "--model", d / "pets.keras",
               *[a.format(**values) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_missing_custom_model_file_exits_2(cli, photos_dir, tmp_path):
    proc = cli("label", photos_dir, tmp_path / "out", "--model", tmp_path / "gone.keras",
               "--labels", tmp_path / "l.txt", "--preprocess", "tf")
    assert proc.returncode == 2 and "model file not found" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model, min_top1, min_top5", [
    ("efficientnet_lite1", 0.84, 0.95),
    ("efficientnet_lite2", 0.88, 0.97),
])
def test_embedded_lite_accuracy_on_the_shared_imagenet_sample(cli, shared_images, tmp_path,
                                                               model, min_top1, min_top5):
    proc = cli("label", shared_images, tmp_path / "out", "--model", model, "--batch-size", "50", "--json")
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == 100 and set(df.model) == {model}
    truth = df.image_id.str.split("_").str[0]
    top1 = (df.label_id == truth).mean()
    top5 = pd.Series([t in list(ids) for t, ids in zip(truth, df.label_ids)]).mean()
    print(f"{model} on imagenet-sample-100: top-1 {top1:.2f}, top-5 {top5:.2f}")
    assert top1 >= min_top1 and top5 >= min_top5
