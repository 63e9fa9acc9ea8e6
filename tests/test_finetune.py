"""pipeline finetune: training data checks, split and scores, then the real CLI on real photos
(train, re-evaluate through `pipeline label --model BUNDLE`, a second run on a training bundle,
kill -9 and --resume). The end-to-end tests train on crops of scikit-image's photos, so they
run in a fresh clone; only the accuracy test needs ../shared."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import SKIMAGE_PHOTOS, read_summary, save_photo, skimage_photo
from pipeline.exitcodes import ConfigError
from pipeline.finetune import FinetuneConfig, TrainingDataError
from pipeline.finetune.data import (Example, class_weights, data_fingerprint, read_examples,
                                    stratified_split)
from pipeline.finetune.evaluate import score
from pipeline.finetune.network import feature_tensor, layer_groups
from pipeline.finetune.train import AlreadyComplete, check_bundle_dir, make_bundle_dir
from pipeline.finetune.training_checkpoints import STATE_VERSION
from pipeline.sources import local_ref
from pipeline.models import bundle
from pipeline.models import get as get_model
from pipeline.types import ModelRequest
from pipeline.models.imagenet import imagenet_labels

# The 3-class set, from the file names of the shared ImageNet sample (they start with the wnid),
# by ImageNet-1k class index: dog = 151..268 (Chihuahua .. Mexican hairless); bird = 7..24
# (cock .. great grey owl), 80..100 (black grouse .. black swan), 127..146 (white stork ..
# albatross); other = every other class, plus scikit-image's photos (none is a dog or a bird).
DOG = range(151, 269)
BIRD = (*range(7, 25), *range(80, 101), *range(127, 147))


def class_of(wnid: str) -> str:
    index = imagenet_labels().ids.index(wnid)
    return "dog" if index in DOG else "bird" if index in BIRD else "other"


def copy_shared(shared_images, root, classes=("dog", "bird", "other")):
    for f in sorted(shared_images.iterdir()):
        name = class_of(f.name[:9])
        if name in classes:
            (root / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / name / f.name)
    return root


def load_bundle_model(bundle_dir):
    import keras

    return keras.models.load_model(bundle_dir / "model.keras", compile=False)


# ---- training data, split, scores (in-process, no network needed) -----------------------

def write_images(directory, *names):
    for name in names:
        save_photo(skimage_photo("chelsea"), directory / name, quality=80)


def test_folder_data_one_subfolder_per_class(tmp_path):
    write_images(tmp_path / "cats", "a.jpg", "deep/b.jpg")
    write_images(tmp_path / "dogs", "c.jpg")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    write_images(tmp_path, "loose.jpg")  # not in a class folder: ignored, as Keras does
    classes, examples = read_examples(str(tmp_path))
    assert classes == ["cats", "dogs"]
    assert [(e.image_id, e.label) for e in examples] == [("cats/a.jpg", 0), ("cats/deep/b.jpg", 0),
                                                         ("dogs/c.jpg", 1)]
    assert all(os.path.isabs(e.path) and os.path.isfile(e.path) for e in examples)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_paths_resolve_against_its_folder(tmp_path, suffix):
    write_images(tmp_path / "img", "a.jpg", "b.jpg", "c.jpg")
    frame = pd.DataFrame({"path": ["img/a.jpg", str(tmp_path / "img" / "b.jpg"), "img/c.jpg",
                                   "./img/a.jpg"],
                          "label": ["intact", "damaged", "intact", "intact"], "note": list("wxyz")})
    manifest = tmp_path / "sub" / f"train{suffix}"
    manifest.parent.mkdir()
    frame["path"] = ["../" + p if not os.path.isabs(p) else p for p in frame.path]
    frame.to_csv(manifest, index=False) if suffix == ".csv" else frame.to_parquet(manifest)
    classes, examples = read_examples(str(manifest))
    assert classes == ["damaged", "intact"]
    assert sorted((os.path.basename(e.path), classes[e.label]) for e in examples) == [
        ("a.jpg", "intact"), ("b.jpg", "damaged"), ("c.jpg", "intact")]  # a.jpg listed twice: once


@pytest.mark.parametrize("layout, message", [
    ({"only/a.jpg": None}, "need at least 2 classes"),
    ({"a/x.jpg": None, "b/": None}, "class 'b' is empty"),
    ({"m.csv": "path,kind\nx.jpg,a\n"}, "needs a 'label' column; it has: path, kind"),
    ({"m.csv": "path,label\nx.jpg,a\ny.jpg,\n"}, "lists y.jpg without a label"),
    ({"m.csv": "path,label\nx.jpg,a\n,b\ny.jpg,b\n"}, r"m.csv line 3: no path given \(label 'b'\)"),
    ({"m.csv": "id,path,label\nA,x.jpg,a\nB,,b\n"}, "m.csv line 3: no path given for id .B."),
    ({"m.csv": "path,label\nx.jpg,a\nx.jpg,b\n"}, "under two labels"),
    ({"m.csv": "path,label\nx.jpg,a\n./x.jpg,b\n"}, "under two labels"),  # one file, two spellings
    ({"m.csv": "id,path,label\nA,x.jpg,a\nA,y.jpg,b\n"}, "gives the id 'A' to two files"),
    ({"m.csv": "path,label\nx.jpg,a\ny.jpg,a\n"}, "need at least 2 classes"),
    ({"m.txt": "x.jpg\n"}, "DATA must be a folder"),
])
def test_bad_training_data_is_explained(tmp_path, layout, message):
    target = tmp_path
    for name, content in layout.items():
        path = tmp_path / name
        if name.endswith("/"):
            path.mkdir(parents=True)
        elif content is None:
            write_images(tmp_path, name)
        else:
            path.write_text(content)
            target = path
    with pytest.raises(ConfigError, match=message):  # TrainingDataError, or the manifest's own
        read_examples(str(target))


def test_missing_data_and_bad_options_are_config_errors(tmp_path):
    with pytest.raises(TrainingDataError, match="not found"):
        read_examples(str(tmp_path / "nope"))
    for bad in ({"val_split": 1.0}, {"epochs": 0}, {"unfreeze_top": -1}, {"learning_rate": 0.0}):
        with pytest.raises(ConfigError):
            FinetuneConfig(**bad)


WRONG_TYPES = {  # each key of FinetuneConfig with a value of another type
    "data": 5, "bundle": ["b"], "base": 5, "epochs": "3", "val_split": "0.2", "unfreeze_top": 1.0,
    "batch_size": "32", "learning_rate": "fast", "seed": True, "patience": None,
    "augment_copies": 2.5, "dropout": "0.2", "max_pixels": "many", "max_file_bytes": 1e6,
    "cache_dir": 5, "resume": "false",
}


def test_wrong_types_cover_every_key():
    import dataclasses

    assert set(WRONG_TYPES) == {f.name for f in dataclasses.fields(FinetuneConfig)}


@pytest.mark.parametrize("key", sorted(WRONG_TYPES))
def test_every_option_is_checked_by_its_type_naming_the_key(key):
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        FinetuneConfig(**{key: WRONG_TYPES[key]})


def test_a_bad_option_exits_2_before_anything_runs(cli, tmp_path):
    proc = cli("finetune", tmp_path / "data", tmp_path / "bundle", "--val-split", "1.5")
    assert proc.returncode == 2 and "val_split must be between 0 and 1" in proc.stderr, proc.stderr
    assert not (tmp_path / "bundle").exists()


def test_split_is_stratified_deterministic_and_keeps_each_class_in_both():
    labels = np.array([0] * 7 + [1] * 11 + [2] * 87)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[val]).tolist() == [1, 2, 17]  # round(0.2 n) per class, >= 1
    assert [a.tolist() for a in stratified_split(labels, 0.2, seed=0)] == [train.tolist(), val.tolist()]
    assert stratified_split(labels, 0.2, seed=1)[1].tolist() != val.tolist()
    _, val2 = stratified_split(np.array([0, 0, 1, 1]), 0.9, seed=0)
    assert np.bincount(np.array([0, 0, 1, 1])[val2]).tolist() == [1, 1]  # never a whole class


def test_class_weights_balance_the_classes():
    w = class_weights(np.array([0] * 10 + [1] * 30), 2)
    assert w == {0: 2.0, 1: 40 / 60}
    assert 10 * w[0] == pytest.approx(30 * w[1])


def test_score_confusion_matrix_precision_recall():
    result = score(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 1]), ["a", "b", "c"])
    assert result["val_accuracy"] == pytest.approx(3 / 5)
    assert result["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert result["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "support": 2}
    assert result["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert result["per_class"]["c"] == {"precision": None, "recall": 0.0, "support": 1}


def test_random_crop_stays_inside_the_labeling_crop_and_keeps_80_to_100_percent():
    import tensorflow as tf

    from pipeline.finetune.views import random_window

    # the labeling crop of a 300x451 image, by EfficientNet's eval recipe: side int(0.875 * 300),
    # offsets ((300 - 262 + 1) // 2, (451 - 262 + 1) // 2)
    top0, left0, side0 = 19, 95, 262
    for u in ([0.0, 0.0, 0.0, 0.0], [0.999, 0.999, 0.999, 0.0], [0.5, 0.3, 0.9, 0.0]):
        top, left, h, w = random_window(tf.constant(300), tf.constant(451), tf.constant(1), 0.875,
                                         tf.constant(u)).numpy()
        assert h == w and 0.8 * side0 - 1 <= h <= side0
        assert top0 <= top and top + h <= top0 + side0 and left0 <= left and left + w <= left0 + side0
    smallest = random_window(tf.constant(300), tf.constant(451), tf.constant(1), 0.875,
                             tf.constant([0.0] * 4)).numpy()
    assert smallest.tolist() == [19, 95, 209, 209]  # 0.8 x 262 = 209.6, at the crop's corner


def test_augmented_views_are_fixed_by_seed_and_view(tmp_path):
    from pipeline.finetune.views import image_dataset
    from pipeline.types import Preprocess

    write_images(tmp_path, "a.jpg")
    examples = [Example(local_ref("a.jpg", tmp_path / "a.jpg"), 0)]
    cfg, pre = FinetuneConfig(), Preprocess(64)

    def view(v, seed=0):
        dataset = image_dataset(examples, pre, FinetuneConfig(seed=seed), view=v)
        return next(dataset.as_numpy_iterator())[0][0]

    plain = next(image_dataset(examples, pre, cfg).as_numpy_iterator())[0][0]
    assert np.array_equal(view(1), view(1))
    assert not np.array_equal(view(1), view(2)) and not np.array_equal(view(1), plain)
    assert not np.array_equal(view(1), view(1, seed=1))


def test_features_are_the_pooled_layer_and_groups_follow_block_names():
    from pipeline.models import efficientnet_lite

    model = efficientnet_lite.build("efficientnet_lite0")
    assert feature_tensor(model) is model.get_layer("avg_pool").output
    names = [group[0].name.split("_")[0] for group in layer_groups(model)]
    assert names == ["stem"] + [f"block{i}" for i in range(16)] + ["head", "predictions"]


# ---- the real CLI on real photos ------------------------------------------------------------

# Generated training data: each class is one of scikit-image's photos, every image of it a
# different random crop (40-90% of the side), flip and size, so no two files are alike.
PHOTO_OF_CLASS = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}


def write_class_images(root, sizes: dict[str, int], seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in sizes.items():
        photo = skimage_photo(PHOTO_OF_CLASS[name])
        height, width = photo.shape[:2]
        for i in range(count):
            side = int(min(height, width) * rng.uniform(0.4, 0.9))
            top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            crop = photo[top:top + side, left:left + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            size = int(rng.integers(96, 257))
            image = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size)))
            if i % 4 == 3:
                save_photo(image, root / name / f"{name}{i:02d}.png")
            else:
                save_photo(image, root / name / f"{name}{i:02d}.jpg", quality=85)
    return root


THREE_CLASS_SIZES = {"cat": 6, "coffee": 8, "rocket": 11}  # validation: 1, 2, 2 (0.2 of each)


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    root = write_class_images(tmp_path_factory.mktemp("train") / "data", THREE_CLASS_SIZES)
    (root / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated download")
    return root


TRAINED_ARGS = ["--epochs", "10", "--json"]  # these classes are easy: the loss falls to the cap


@pytest.fixture(scope="module")
def trained(cli, three_classes, tmp_path_factory):
    bundle_dir = tmp_path_factory.mktemp("bundles") / "animals-v1"
    started = time.monotonic()
    proc = cli("finetune", three_classes, bundle_dir, *TRAINED_ARGS, timeout=900)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(proc)
    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    print(f"\nfinetune head-only, 3 generated classes, {summary['train_images']} training images: wall "
          f"{wall:.1f}s, val accuracy {summary['val_accuracy']:.3f} on {summary['val_images']} "
          f"images, epochs {summary['epochs']}")
    return bundle_dir, summary, metrics, proc.stderr


def test_bundle_holds_model_labels_preprocessing_metrics_and_no_leftovers(trained):
    bundle_dir, summary, metrics, _ = trained
    assert sorted(os.listdir(bundle_dir)) == ["_lock", "bundle.json", "labels.json", "metrics.json",
                                              "model.keras", "preprocess.json"]
    assert json.loads((bundle_dir / "labels.json").read_text())["names"] == ["cat", "coffee", "rocket"]
    assert json.loads((bundle_dir / "preprocess.json").read_text()) == {
        "size": 224, "crop_fraction": 0.875, "resize": "bicubic", "mean": [127.0] * 3,
        "std": [128.0] * 3, "bgr": False}  # the base model's labeling recipe, unchanged
    info = json.loads((bundle_dir / "bundle.json").read_text())
    assert info["base_model"] == "efficientnet_lite0" and info["format_version"] == 1
    assert info["created_at"] and info["training"]["seed"] == 0
    assert info["training"]["unfreeze_top"] == 0 and info["training"]["augment_copies"] == 3
    assert metrics["val_accuracy"] == summary["val_accuracy"]


def test_metrics_count_every_image_once_and_list_the_unreadable_one(trained, three_classes):
    _, summary, metrics, stderr = trained
    total = sum(1 for _ in three_classes.rglob("*.*"))
    assert metrics["train_images"] + metrics["val_images"] + metrics["skipped_images"] == total
    assert total == sum(THREE_CLASS_SIZES.values()) + 1
    assert [(s["image_id"], s["label"], s["error_kind"]) for s in metrics["skipped"]] == [
        ("coffee/broken.jpg", "coffee", "corrupt")]
    assert "skipped unreadable coffee/broken.jpg" in stderr
    val_classes = [row["label"] for row in metrics["validation"]]
    assert {c: val_classes.count(c) for c in set(val_classes)} == {"cat": 1, "coffee": 2, "rocket": 2}
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    assert matrix.sum() == metrics["val_images"] == 5
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics["val_accuracy"])
    assert [metrics["per_class"][c]["support"] for c in ("cat", "coffee", "rocket")] == [1, 2, 2]


def test_head_learned_with_early_stopping(trained):
    _, summary, metrics, _ = trained
    head = [h for h in metrics["history"] if h["phase"] == "head"]
    assert [h["epoch"] for h in head] == list(range(1, len(head) + 1))
    assert head[-1]["accuracy"] >= 0.95 > head[0]["accuracy"]  # it learned its training set
    best = metrics["best_epochs"]["head"]
    assert head[best - 1]["val_loss"] == min(h["val_loss"] for h in head)
    assert len(head) < 10 or best == 10  # stopped early unless still improving at the cap
    assert summary["epochs"] == {"head": len(head)} and metrics["sessions"] == 1


def test_reported_accuracy_matches_labeling_the_validation_images(cli, trained, tmp_path):
    bundle_dir, _, metrics, _ = trained
    val = pd.DataFrame([{"id": r["image_id"], "path": r["path"], "truth": r["label"]}
                        for r in metrics["validation"]])
    val[["id", "path"]].to_csv(tmp_path / "val.csv", index=False)
    proc = cli("label", tmp_path / "val.csv", tmp_path / "out", "--model", bundle_dir, "--json")
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(tmp_path / "out").merge(val, left_on="image_id", right_on="id")
    assert len(df) == metrics["val_images"] and (df.status == "ok").all()
    accuracy = (df.label_id == df.truth).mean()
    print(f"\nre-evaluated through `pipeline label --model BUNDLE`: {accuracy:.3f} "
          f"(reported {metrics['val_accuracy']:.3f})")
    assert accuracy == metrics["val_accuracy"]
    reported = {r["image_id"]: r["predicted"] for r in metrics["validation"]}
    assert dict(zip(df.image_id, df.label_id)) == reported
    assert (df.label == df.label_id).all() and set(df.label_id) <= {"cat", "coffee", "rocket"}
    assert (df.model == "animals-v1").all()


def test_resume_of_a_finished_bundle_says_done_and_changes_nothing(cli, trained, three_classes):
    bundle_dir = trained[0]
    before = (bundle_dir / "model.keras").stat().st_mtime_ns
    proc = cli("finetune", three_classes, bundle_dir, *TRAINED_ARGS, "--resume")
    assert proc.returncode == 0 and "already complete" in proc.stderr, proc.stderr
    assert (bundle_dir / "model.keras").stat().st_mtime_ns == before


@pytest.mark.parametrize("content, resume, outcome", [
    ({}, False, None),
    ({"_lock": "", "checkpoints/.tmp-1-features.npz": ""}, False, None),  # died before a commit
    ({"checkpoints/state.json": "{}"}, False, "interrupted fine-tuning run; add --resume"),
    ({"checkpoints/state.json": "{}"}, True, None),
    ({"bundle.json": "{}", "model.keras": ""}, False, "already holds a finished bundle"),
    ({"bundle.json": "{}", "model.keras": ""}, True, AlreadyComplete),
    ({"notes.txt": "mine"}, False, "exists and is not empty"),
])
def test_bundle_directory_is_never_overwritten(tmp_path, content, resume, outcome):
    for name, text in content.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cfg = FinetuneConfig(data="d", bundle=str(tmp_path), resume=resume)
    make_bundle_dir(cfg.bundle)
    if outcome is None:
        check_bundle_dir(cfg)
    elif outcome is AlreadyComplete:
        with pytest.raises(AlreadyComplete):
            check_bundle_dir(cfg)
    else:
        with pytest.raises(ConfigError, match=outcome):
            check_bundle_dir(cfg)


def test_unusable_data_exits_2_before_writing_anything(cli, tmp_path):
    write_images(tmp_path / "data" / "cats", "a.jpg")
    (tmp_path / "data" / "dogs").mkdir()
    proc = cli("finetune", tmp_path / "data", tmp_path / "bundle")
    assert proc.returncode == 2 and "class 'dogs' is empty" in proc.stderr, proc.stderr
    assert not (tmp_path / "bundle").exists()


def test_a_class_of_only_unreadable_images_exits_2(cli, tmp_path):
    write_images(tmp_path / "data" / "cats", "a.jpg", "b.jpg")
    (tmp_path / "data" / "dogs").mkdir()
    (tmp_path / "data" / "dogs" / "x.jpg").write_bytes(b"<html>404</html>")
    (tmp_path / "data" / "dogs" / "y.png").write_bytes(b"")
    proc = cli("finetune", tmp_path / "data", tmp_path / "bundle")
    assert proc.returncode == 2, proc.stderr
    assert "class 'dogs' has 0 readable image(s) (2 unreadable)" in proc.stderr
    assert "skipped unreadable dogs/x.jpg: unsupported_format" in proc.stderr


# ---- kill -9 mid-epoch, then --resume ---------------------------------------------------------

@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    """A 2-class manifest (relative paths) over generated cat and coffee photos."""
    root = write_class_images(tmp_path_factory.mktemp("small") / "photos", {"cat": 8, "coffee": 8},
                              seed=1)
    rows = [{"path": f"photos/{p.parent.name}/{p.name}", "label": p.parent.name}
            for p in sorted(root.rglob("*.*"))]
    pd.DataFrame(rows).to_csv(root.parent / "train.csv", index=False)
    return root.parent / "train.csv"


FINE_TUNE_ARGS = ["--unfreeze-top", "1", "--epochs", "3", "--augment-copies", "1", "--json"]


def wait_for_state(path, done, proc, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            state = json.loads(path.read_text())
            if done(state):
                return state
        if proc.poll() is not None:
            pytest.fail(f"finetune exited early ({proc.returncode})")
        time.sleep(0.1)
    pytest.fail("finetune did not reach the expected epoch in time")


def wait_for_line(path, text, proc, timeout=600):
    """Until the log file at `path` holds `text` (a line the run writes when it gets there)."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        if proc.poll() is not None:
            pytest.fail(f"finetune exited ({proc.returncode}) before it logged {text!r}")
        if time.monotonic() > deadline:
            pytest.fail(f"finetune did not log {text!r} in time")
        time.sleep(0.05)


def start_finetune(bundle_dir, data, env, log):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "finetune", data, bundle_dir,
                             *FINE_TUNE_ARGS], env=env, stdout=log, stderr=subprocess.STDOUT)


def test_kill_mid_epoch_then_resume_continues_and_ends_where_an_uninterrupted_run_does(
        cli, cli_env, cache_home, two_classes, tmp_path):
    bundle_dir = tmp_path / "killed"
    with open(tmp_path / "reference.log", "w") as ref_log, open(tmp_path / "killed.log", "w") as log:
        reference = start_finetune(tmp_path / "reference", two_classes, cli_env, ref_log)
        proc = start_finetune(bundle_dir, two_classes, cli_env, log)
        try:  # killed inside epoch 2: epoch 1 is committed before its line, epoch 2 takes seconds
            wait_for_line(tmp_path / "killed.log", "finetune epoch 1/3:", proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert reference.wait(timeout=900) == 0, (tmp_path / "reference.log").read_text()
    state = json.loads((bundle_dir / "checkpoints" / "state.json").read_text())
    killed_after = state["epoch"]
    assert state["phase"] == "finetune" and killed_after == 1
    assert not (bundle_dir / "model.keras").exists()  # a killed run never looks complete
    assert bundle.is_bundle(str(bundle_dir)) and not bundle.is_complete(str(bundle_dir))
    resumed = cli("finetune", two_classes, bundle_dir, *FINE_TUNE_ARGS, "--resume", timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {bundle_dir}: finetune phase after epoch {killed_after}" in resumed.stderr
    assert "head epoch" not in resumed.stderr and "features of" not in resumed.stderr
    assert f"finetune epoch {killed_after + 1}/3" in resumed.stderr
    assert read_summary(resumed)["resumed"] is True

    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    epochs = [(h["phase"], h["epoch"], h["session"]) for h in metrics["history"]]
    finetune_epochs = [(e, s) for p, e, s in epochs if p == "finetune"]
    assert finetune_epochs == [(e, 1 if e <= killed_after else 2) for e in range(1, 4)]
    assert all(s == 1 for p, _, s in epochs if p == "head")
    assert not (bundle_dir / "checkpoints").exists()

    # the same seed gives the same model, interrupted or not
    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert metrics["validation"] == expected["validation"]
    losses = [[(h["loss"], h["val_loss"]) for h in m["history"]] for m in (metrics, expected)]
    assert losses[0] == losses[1]
    tuned = load_bundle_model(bundle_dir)
    reference_weights = load_bundle_model(tmp_path / "reference").get_weights()
    assert len(tuned.get_weights()) == len(reference_weights)
    for got, want in zip(tuned.get_weights(), reference_weights):
        np.testing.assert_array_equal(got, want)

    # --unfreeze-top 1 trained the top layer group ("head") only; BatchNorm stayed frozen
    base = get_model(ModelRequest(cache_dir=str(cache_home / "pipeline"))).load_keras()

    def unchanged(name):
        return all(np.array_equal(a, b) for a, b in zip(tuned.get_layer(name).get_weights(),
                                                         base.get_layer(name).get_weights()))

    assert not unchanged("head_conv")
    assert unchanged("head_bn") and unchanged("block15_project_conv") and unchanged("stem_conv")


def test_resume_refuses_other_options(cli, two_classes, tmp_path):
    state_dir = tmp_path / "b" / "checkpoints"
    state_dir.mkdir(parents=True)
    params = FinetuneConfig().result_params()
    classes, examples = read_examples(str(two_classes))
    (state_dir / "state.json").write_text(json.dumps({
        "version": STATE_VERSION, "params": dict(params, seed=7),
        "fingerprint": data_fingerprint(classes, examples), "phase": "head", "epoch": 1,
        "best_epoch": 1, "best_val_loss": 0.5, "wait": 0, "best_epochs": {}, "history": [],
        "sessions": 1, "files": {}}))
    proc = cli("finetune", two_classes, tmp_path / "b", "--resume")
    assert proc.returncode == 2, proc.stderr
    assert "changed: seed=0 (interrupted run: 7)" in proc.stderr


def test_a_damaged_checkpoint_state_is_a_clear_error(cli, two_classes, tmp_path):
    state_dir = tmp_path / "b" / "checkpoints"
    state_dir.mkdir(parents=True)
    (state_dir / "state.json").write_text(json.dumps({"version": STATE_VERSION, "phase": "head"}))
    proc = cli("finetune", two_classes, tmp_path / "b", "--resume")
    assert proc.returncode == 2, proc.stderr
    assert "checkpoint state is damaged" in proc.stderr and "Traceback" not in proc.stderr


# ---- a second run while one trains (#13.6) -----------------------------------------------------

def test_a_second_run_on_a_bundle_that_is_training_exits_3_and_suggests_no_deletion(
        cli_env, two_classes, tmp_path):
    bundle_dir = tmp_path / "training"
    long_run = ["--unfreeze-top", "1", "--epochs", "200", "--patience", "200",  # until SIGTERM
                "--augment-copies", "0"]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "pipeline", "finetune", two_classes,
                                  bundle_dir, *long_run], env=cli_env, stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            wait_for_state(bundle_dir / "checkpoints" / "state.json", lambda s: True, first)
            second = [subprocess.Popen([sys.executable, "-m", "pipeline", "finetune", two_classes,
                                        bundle_dir, *long_run, *extra], env=cli_env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                      for extra in ([], ["--resume"])]
            outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in second]
            assert first.poll() is None, ("the first run ended before the second ones were "
                                          f"refused:\n{(tmp_path / 'first.log').read_text()}")
        finally:
            first.send_signal(signal.SIGTERM)
            first_code = first.wait(timeout=120)
    for code, stderr in outcomes:
        assert code == 3, (code, stderr)
        assert "is being trained by another run" in stderr and "locked by pid" in stderr
        assert not any(word in stderr.lower() for word in ("remove", "delete", "start over"))
    assert first_code == 130, (tmp_path / "first.log").read_text()
    assert "--resume" in (tmp_path / "first.log").read_text()
    assert bundle.is_bundle(str(bundle_dir)) and not bundle.is_complete(str(bundle_dir))


# ---- a manifest of s3:// paths ---------------------------------------------------------------

def test_manifest_of_s3_paths_trains_from_s3(cli_env, s3, tmp_path):
    from conftest import run_cli, upload_dir

    upload_dir(s3.client, s3.bucket, write_class_images(tmp_path / "data", {"cat": 3, "coffee": 3}),
               "train")
    rows = [{"path": f"s3://{s3.bucket}/train/{name}/{name}{i:02d}.jpg", "label": name}
            for name in ("cat", "coffee") for i in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "elsewhere.csv", index=False)
    proc = run_cli(["finetune", tmp_path / "elsewhere.csv", tmp_path / "bundle", "--epochs", "2",
                    "--augment-copies", "0", "--json"], {**cli_env, **s3.env}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "bundle" / "metrics.json").read_text())
    assert metrics["train_images"] == 4 and metrics["skipped_images"] == 0
    validated = [r["path"] for r in metrics["validation"]]  # the URIs as listed, not joined
    assert len(validated) == 2 and set(validated) <= {r["path"] for r in rows}


# ---- accuracy on the shared ImageNet sample (needs ../shared) --------------------------------

@pytest.mark.slow
def test_three_classes_of_the_shared_sample_accuracy(cli, shared_images, tmp_path):
    """The README's fine-tuning figures: dog / bird / other from the shared sample plus
    scikit-image's photos, head only."""
    root = copy_shared(shared_images, tmp_path / "data")
    for name in SKIMAGE_PHOTOS:
        save_photo(skimage_photo(name), root / "other" / f"skimage_{name}.jpg", quality=90)
    started = time.monotonic()
    proc = cli("finetune", root, tmp_path / "animals", "--json", timeout=900)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "animals" / "metrics.json").read_text())
    print(f"\nfinetune head-only, 3 classes, {metrics['train_images']} training images: wall "
          f"{wall:.1f}s, val accuracy {metrics['val_accuracy']:.3f} on {metrics['val_images']} "
          f"images, epochs {metrics['epochs']}; wrong: "
          f"{[(r['image_id'], r['predicted']) for r in metrics['validation'] if r['label'] != r['predicted']]}")
    val_classes = [row["label"] for row in metrics["validation"]]
    assert {c: val_classes.count(c) for c in set(val_classes)} == {"bird": 1, "dog": 2, "other": 17}
    assert metrics["val_accuracy"] >= 0.85
    head = metrics["history"]
    assert len(head) < 30  # these classes overlap: the validation loss turns and training stops
    assert head[metrics["best_epochs"]["head"] - 1]["val_loss"] == min(h["val_loss"] for h in head)
