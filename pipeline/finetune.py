"""Fine-tune a pretrained network on your own classes into a bundle `pipeline label` can use.

DATA (one folder per class, or a path/label manifest) goes through the labeling reader's own
preprocessing into the frozen base network once: the plain view of every image plus a few fixed
augmented views (random flip, small random crop) of each training image become pooled feature
vectors. A new head (dropout + softmax Dense) trains on them with class weights and early
stopping on a stratified validation split. With --unfreeze-top K, the top K layer groups of
the base then train on freshly augmented images at learning_rate / 10, BatchNorm kept in
inference mode. The finished model is evaluated through the labeling reader on the validation
images, and the bundle is written (see models/bundle.py). Every epoch is checkpointed in
BUNDLE/checkpoints; --resume continues after the last completed epoch.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .config import ConfigError, RunConfig, default_cache_dir
from .exitcodes import FatalError
from .models import bundle
from .models.imagenet import Labels
from .models.registry import Preprocess

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".parquet")
AUGMENT_MIN_SCALE = 0.8  # a random crop keeps 80-100% of the labeling crop's side
FINE_TUNE_LR_FACTOR = 0.1  # unfrozen base layers train at learning_rate x this
STATE_VERSION = 1
# Options that shape the result: --resume must be given the same ones as the interrupted run.
RESULT_PARAMS = ("base", "epochs", "val_split", "unfreeze_top", "batch_size", "learning_rate",
                 "seed", "patience", "augment_copies", "dropout", "max_pixels", "max_file_bytes")


class TrainingDataError(ConfigError):
    """DATA cannot train a classifier (too few classes, an empty class, a bad manifest)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of `pipeline finetune` (kept apart from the labeling RunConfig)."""

    data: str = ""
    bundle: str = ""
    base: str = "efficientnet_lite0"
    epochs: int = 30  # at most, per phase
    val_split: float = 0.2
    unfreeze_top: int = 0
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    patience: int = 5  # epochs without a better validation loss before stopping
    augment_copies: int = 3  # fixed augmented views per training image for head training
    dropout: float = 0.2
    max_pixels: int = RunConfig.max_pixels
    max_file_bytes: int = RunConfig.max_file_bytes
    cache_dir: str = field(default_factory=default_cache_dir)
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "max_pixels", "max_file_bytes"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("unfreeze_top", "augment_copies", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        if not 0.0 < self.val_split < 1.0:
            raise ConfigError(f"val_split must be between 0 and 1 (exclusive), got {self.val_split}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def result_params(self) -> dict:
        return {name: getattr(self, name) for name in RESULT_PARAMS}


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class FinetuneSummary:
    bundle: str
    classes: list[str]
    train_images: int
    val_images: int
    skipped: int
    val_accuracy: float
    epochs: dict[str, int]
    resumed: bool
    wall_seconds: float

    def line(self) -> str:
        epochs = ", ".join(f"{k} {v}" for k, v in self.epochs.items())
        return (f"val accuracy {self.val_accuracy:.3f} on {self.val_images} images "
                f"({len(self.classes)} classes, {self.train_images} training images, "
                f"{self.skipped} skipped; epochs: {epochs}), wall {self.wall_seconds:.1f}s "
                f"-> {self.bundle}")


class TrainingFailed(FatalError, RuntimeError):
    """Reading or training failed mid-run (e.g. an image vanished); checkpoints are kept."""


class AlreadyComplete(Exception):
    """--resume on a bundle that finished; nothing to do."""


# ---- training data ---------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    image_id: str  # path relative to DATA (folders) or as the manifest wrote it
    path: str  # absolute
    label: int


def read_examples(data: str) -> tuple[list[str], list[Example]]:
    """Class names (sorted) and the labeled images of DATA; TrainingDataError if unusable."""
    p = Path(data)
    if p.is_dir():
        classes, examples = _folder_examples(p)
    elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
        classes, examples = _manifest_examples(p)
    elif not p.exists():
        raise TrainingDataError(f"training data not found: {data}")
    else:
        raise TrainingDataError(f"{data}: DATA must be a folder with one subfolder per class, or a "
                                f".csv/.parquet manifest with 'path' and 'label' columns")
    if len(classes) < 2:
        found = ", ".join(repr(c) for c in classes) or "none"
        raise TrainingDataError(f"need at least 2 classes to train a classifier; {data} has {found}")
    return classes, examples


def _folder_examples(root: Path) -> tuple[list[str], list[Example]]:
    from .sources import iter_refs

    with os.scandir(root) as it:
        classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    examples = []
    for label, name in enumerate(classes):
        refs = list(iter_refs(str(root / name)))
        if not refs:
            raise TrainingDataError(f"class {name!r} is empty: {root / name} has no images")
        examples += [Example(f"{name}/{r.image_id}", r.uri, label) for r in refs]
    return classes, examples


def _manifest_examples(path: Path) -> tuple[list[str], list[Example]]:
    rows = _manifest_rows(path)
    base = path.absolute().parent
    classes = sorted(set(label for _, label in rows))
    index = {c: i for i, c in enumerate(classes)}
    by_path: dict[str, Example] = {}
    for raw, label in rows:
        absolute = os.path.normpath(raw if os.path.isabs(raw) else os.path.join(base, raw))
        seen = by_path.get(absolute)
        if seen is not None and seen.label != index[label]:
            raise TrainingDataError(f"manifest {path} lists {raw} under two labels: "
                                    f"{classes[seen.label]!r} and {label!r}")
        by_path.setdefault(absolute, Example(raw, absolute, index[label]))
    return classes, list(by_path.values())


def _manifest_rows(path: Path) -> list[tuple[str, str]]:
    import pandas as pd

    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            frame = pd.read_parquet(path)
    except Exception as e:  # pandas/pyarrow raise many types for unreadable files
        raise TrainingDataError(f"manifest {path} is not readable: {e}") from e
    missing = [c for c in ("path", "label") if c not in frame.columns]
    if missing:
        raise TrainingDataError(f"manifest {path} needs 'path' and 'label' columns; it lacks "
                                f"{', '.join(missing)} (it has: {', '.join(map(str, frame.columns))})")
    rows = []
    for number, (raw, label) in enumerate(zip(frame["path"], frame["label"]), start=1):
        raw, label = _cell(raw), _cell(label)
        if not raw or not label:
            raise TrainingDataError(f"manifest {path} data row {number} has an empty path or label")
        rows.append((raw, label))
    if not rows:
        raise TrainingDataError(f"manifest {path} has no rows")
    return rows


def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()


def data_fingerprint(classes: list[str], examples: list[Example]) -> str:
    """Changes when a class, a file, its label, size or mtime changes."""
    h = hashlib.sha256(json.dumps(classes).encode())
    for ex in examples:
        try:
            st = os.stat(ex.path)
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        h.update(json.dumps([ex.path, ex.label, stamp]).encode())
    return h.hexdigest()


def stratified_split(labels: np.ndarray, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): round(val_split x n) of each class (at least 1, never all) to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(max(1, round(len(idx) * val_split)), len(idx) - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """n / (k x n_c): every class weighs the same in the loss, whatever its size."""
    counts = np.bincount(labels, minlength=n_classes)
    return {c: float(len(labels) / (n_classes * counts[c])) for c in range(n_classes) if counts[c]}


def _check_class_sizes(classes: list[str], labels: np.ndarray, skipped: list[dict]) -> None:
    counts = np.bincount(labels, minlength=len(classes)) if len(labels) else np.zeros(len(classes), int)
    for c, name in enumerate(classes):
        if counts[c] < 2:
            bad = sum(1 for s in skipped if s["label"] == name)
            raise TrainingDataError(
                f"class {name!r} has {counts[c]} readable image(s) ({bad} unreadable); it needs at "
                f"least 2 (one to train on, one to validate with)")


# ---- images: the labeling reader, plus augmented views ----------------------------------

def _ref(ex: Example):
    """The reader opens only regular files, so it needs their size (None: not one)."""
    from .sources import ImageRef

    try:
        st = os.stat(ex.path)
    except OSError:
        return ImageRef(ex.image_id, ex.path, None, None)
    return ImageRef(ex.image_id, ex.path, st.st_size if stat.S_ISREG(st.st_mode) else None,
                    st.st_mtime_ns)


def read_plain_features(examples: list[Example], classes: list[str], extract, pre: Preprocess,
                        cfg: FinetuneConfig) -> tuple[np.ndarray, list[Example], list[dict]]:
    """Features of every readable image as labeling reads it, and the unreadable ones (skipped)."""
    from .reader import ImageReader

    by_id = {ex.image_id: ex for ex in examples}
    features, kept, skipped = [], [], []
    for batch in ImageReader(map(_ref, examples), pre, cfg.batch_size, cfg.max_pixels,
                             cfg.max_file_bytes):
        if batch.refs:
            features.append(extract(batch.images))
            kept += [by_id[r.image_id] for r in batch.refs]
        skipped += [{"image_id": e.ref.image_id, "path": e.ref.uri,
                     "label": classes[by_id[e.ref.image_id].label], "error_kind": e.kind,
                     "error": e.message} for e in batch.errors]
    return (np.concatenate(features) if features else np.zeros((0, 0), np.float32)), kept, skipped


def image_dataset(examples: list[Example], pre: Preprocess, cfg: FinetuneConfig,
                  view: int | None = None):
    """tf.data of (image, label) batches, in order. view=None: the labeling view; view=v: a
    flipped/cropped view that depends only on (seed, v, image index), so reruns see the same."""
    import tensorflow as tf

    from .reader import load_image

    n = len(examples)
    keys = np.arange(n, dtype=np.int64) + (view or 0) * n
    paths = [os.fsencode(ex.path) for ex in examples]
    labels = np.array([ex.label for ex in examples], np.int64)

    @tf.autograph.experimental.do_not_convert  # as in the labeling reader: explicit tf.cond
    def plain(path, label, key):
        return load_image(path, pre, cfg.max_pixels)[0], label

    @tf.autograph.experimental.do_not_convert
    def augmented(path, label, key):
        u = tf.random.stateless_uniform([4], seed=tf.stack([tf.constant(cfg.seed, tf.int64), key]))
        image = load_image(path, pre, cfg.max_pixels,
                           window=lambda h, w, o: _random_window(h, w, o, pre.crop_fraction, u))[0]
        image = tf.cond(u[3] < 0.5, lambda: tf.image.flip_left_right(image), lambda: image)
        return image, label

    options = tf.data.Options()
    options.deterministic = True
    return (tf.data.Dataset.from_tensor_slices((paths, labels, keys))
            .map(plain if view is None else augmented, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(cfg.batch_size)
            .prefetch(tf.data.AUTOTUNE)
            .with_options(options))


def _random_window(height, width, orientation, crop_fraction, u):
    """A square (or, without a crop policy, same-aspect) window 80-100% of the labeling crop's
    side, placed at random inside it; u holds uniform numbers in [0, 1)."""
    import tensorflow as tf

    from .reader import crop_window

    box = crop_window(height, width, crop_fraction, orientation)
    scale = AUGMENT_MIN_SCALE + (1.0 - AUGMENT_MIN_SCALE) * u[0]
    h = tf.maximum(1, tf.cast(scale * tf.cast(box[2], tf.float32), tf.int32))
    w = tf.maximum(1, tf.cast(scale * tf.cast(box[3], tf.float32), tf.int32))
    top = box[0] + tf.cast(u[1] * tf.cast(box[2] - h + 1, tf.float32), tf.int32)
    left = box[1] + tf.cast(u[2] * tf.cast(box[3] - w + 1, tf.float32), tf.int32)
    return tf.stack([top, left, h, w])


def dataset_features(dataset, extract) -> tuple[np.ndarray, np.ndarray]:
    features, labels = [], []
    for images, batch_labels in dataset.as_numpy_iterator():
        features.append(extract(images))
        labels.append(batch_labels)
    return np.concatenate(features), np.concatenate(labels)


# ---- the network -------------------------------------------------------------------------

def feature_tensor(model):
    """The pooled features the base's classifier reads: the last Dense layer's input, before
    any Dropout (EfficientNet-Lite0: the output of `avg_pool`)."""
    from keras import layers

    last = model.layers[-1]
    if not isinstance(last, layers.Dense):
        raise ConfigError(f"base model {model.name} does not end in a Dense classifier, so its "
                          f"feature layer cannot be found")
    x = last.input
    while True:
        producer = next((l for l in model.layers if l.output is x), None)
        if not isinstance(producer, layers.Dropout):
            return x
        x = producer.input


def layer_groups(model) -> list[list]:
    """The model's layers with weights, grouped by the name before the first '_', in order
    (EfficientNet-Lite0: stem, block0 ... block15, head)."""
    groups: dict[str, list] = {}
    for layer in model.layers:
        if layer.weights:
            groups.setdefault(layer.name.split("_")[0], []).append(layer)
    return list(groups.values())


@dataclass
class Networks:
    extractor: object  # base input -> pooled features (frozen)
    head: object  # pooled features -> class probabilities
    full: object  # base input -> class probabilities: the bundle's model
    base_layers: list


def build_networks(base, n_classes: int, cfg: FinetuneConfig) -> Networks:
    """The head shares its layers with the full model, so training one trains the other."""
    import keras
    from keras import layers

    features = feature_tensor(base)
    extractor = keras.Model(base.inputs, features, name="feature_extractor")
    for layer in extractor.layers:
        layer.trainable = False
    dropout = layers.Dropout(cfg.dropout, seed=cfg.seed, name="classifier_dropout")
    dense = layers.Dense(n_classes, activation="softmax", name="classifier",
                         kernel_initializer=keras.initializers.GlorotUniform(seed=cfg.seed))
    pooled = keras.Input(features.shape[1:], name="pooled_features")
    head = keras.Model(pooled, dense(dropout(pooled)), name="classifier_head")
    full = keras.Model(base.inputs, dense(dropout(features)), name=f"{base.name}_finetuned")
    return Networks(extractor, head, full, list(extractor.layers))


def unfreeze_top(nets: Networks, k: int) -> list[str]:
    """Make the top k layer groups trainable, BatchNorm excepted (it stays in inference mode)."""
    from keras import layers

    groups = layer_groups(nets.extractor)
    if k > len(groups):
        raise ConfigError(f"--unfreeze-top {k}: the base model has only {len(groups)} layer groups")
    chosen = {id(layer) for group in groups[len(groups) - k:] for layer in group}
    for layer in nets.base_layers:
        layer.trainable = id(layer) in chosen and not isinstance(layer, layers.BatchNormalization)
    return [group[0].name.split("_")[0] for group in groups[len(groups) - k:]]


def _compile(model, learning_rate: float) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=False)


# ---- checkpoints ---------------------------------------------------------------------------

class Checkpoints:
    """BUNDLE/checkpoints: state.json (the commit point) and the .npz files it names."""

    def __init__(self, bundle_dir: str):
        self.dir = os.path.join(bundle_dir, bundle.CHECKPOINT_DIR)
        self.state_path = os.path.join(self.dir, bundle.STATE_FILE)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def read_state(self) -> dict | None:
        return bundle.read_json(self.state_path) if os.path.isfile(self.state_path) else None

    def commit(self, state: dict) -> None:
        """Make `state` the one to resume from, then delete the files it no longer names."""
        bundle.write_json(self.state_path, state)
        keep = {bundle.STATE_FILE, *state["files"].values()}
        for name in os.listdir(self.dir):
            if name not in keep:
                os.unlink(self.path(name))

    def save_arrays(self, name: str, **arrays: np.ndarray) -> str:
        tmp = self.path(f".tmp-{os.getpid()}-{name}")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(name))
        return name

    def save_variables(self, name: str, model, optimizer=None) -> str:
        arrays = {f"v{i}": np.asarray(v) for i, v in enumerate(model.variables)}
        if optimizer is not None:
            arrays.update({f"o{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
        return self.save_arrays(name, **arrays)

    def load_variables(self, name: str, model, optimizer=None) -> None:
        with np.load(self.path(name)) as saved:
            _assign(model.variables, saved, "v")
            if optimizer is not None:
                optimizer.build(model.trainable_variables)
                _assign(optimizer.variables, saved, "o")


def _assign(variables, saved, prefix: str) -> None:
    count = sum(1 for k in saved.files if k.startswith(prefix))
    if count != len(variables):
        raise ConfigError(f"checkpoint holds {count} {prefix}-variables, the model has "
                          f"{len(variables)}; it belongs to a different run")
    for i, v in enumerate(variables):
        v.assign(saved[f"{prefix}{i}"])


# ---- the run -------------------------------------------------------------------------------

def _log(message: str) -> None:
    log.info(message)


def prepare_bundle_dir(cfg: FinetuneConfig) -> None:
    """Create BUNDLE, or refuse to touch what is in it (--resume continues an interrupted run;
    AlreadyComplete when it finished)."""
    path = cfg.bundle
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"bundle {path} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    if cfg.resume:
        if bundle.is_complete(path):
            raise AlreadyComplete(path)
        return
    if bundle.is_complete(path):
        raise ConfigError(f"{path} already holds a finished bundle; choose another directory")
    if bundle.is_bundle(path):
        raise ConfigError(f"{path} holds an interrupted fine-tuning run; add --resume to continue "
                          f"it, or remove the directory to start over")
    # a run that stopped before its first checkpoint (e.g. on unreadable data) leaves only these
    if set(os.listdir(path)) - {"_lock", bundle.CHECKPOINT_DIR}:
        raise ConfigError(f"bundle directory {path} exists and is not empty")


def finetune(cfg: FinetuneConfig) -> FinetuneSummary:
    """Train, evaluate and write the bundle cfg.bundle; resume it with cfg.resume."""
    from .checkpoint import lock
    from .interrupts import raised_on_signals

    started = time.monotonic()
    classes, examples = read_examples(cfg.data)
    try:
        prepare_bundle_dir(cfg)
    except AlreadyComplete:
        return _summary_of_finished(cfg, started)
    import tensorflow as tf

    with lock(cfg.bundle), raised_on_signals():
        try:
            return _train(cfg, classes, examples, started)
        except tf.errors.OpError as e:  # images were readable in the first pass; one changed since
            first_line = (e.message or str(e)).strip().splitlines()[0]
            raise TrainingFailed(f"{first_line}; completed epochs are kept, fix the data and "
                                 f"run again with --resume") from e


def _summary_of_finished(cfg: FinetuneConfig, started: float) -> FinetuneSummary:
    metrics = bundle.read_json(os.path.join(cfg.bundle, bundle.METRICS_FILE))
    _log(f"{cfg.bundle} is already complete; nothing to resume")
    return FinetuneSummary(cfg.bundle, metrics["classes"], metrics["train_images"],
                           metrics["val_images"], metrics["skipped_images"], metrics["val_accuracy"],
                           metrics["epochs"], True, time.monotonic() - started)


def _train(cfg: FinetuneConfig, classes: list[str], examples: list[Example], started: float):
    import keras

    from . import models
    from .runtime import KerasPredictor

    keras.utils.set_random_seed(cfg.seed)
    ck = Checkpoints(cfg.bundle)
    fingerprint = data_fingerprint(classes, examples)
    state = ck.read_state() if cfg.resume else None
    if state is None:
        shutil.rmtree(ck.dir, ignore_errors=True)  # nothing committed in it
    os.makedirs(ck.dir, exist_ok=True)
    if state is not None:
        _check_resumable(state, cfg, fingerprint)
        state["sessions"] += 1
        _log(f"resuming {cfg.bundle}: {state['phase']} phase after epoch {state['epoch']}")
    elif cfg.resume:
        _log(f"{cfg.bundle} has no checkpoint yet; starting from the beginning")

    spec = models.get(cfg.base, RunConfig(cache_dir=cfg.cache_dir))
    nets = build_networks(spec.load_keras(), len(classes), cfg)
    extract = KerasPredictor(nets.extractor).predict
    if state is None:
        state = _prepare_features(ck, cfg, classes, examples, spec.preprocess, extract, fingerprint)
    split = bundle.read_json(ck.path(state["files"]["split"]))
    with np.load(ck.path(state["files"]["features"])) as f:
        features = {k: f[k] for k in f.files}
    train = [Example(*e) for e in split["train"]]
    val = [Example(*e) for e in split["val"]]
    weights = class_weights(np.array([e.label for e in train]), len(classes))

    if state["phase"] == "head":
        _fit_phase(ck, state, nets.head, cfg, cfg.learning_rate, weights,
                   lambda epoch: _shuffled(features["train_x"], features["train_y"], cfg, epoch),
                   (features["val_x"], features["val_y"]))
    if state["phase"] == "finetune":
        ck.load_variables(state["files"]["head_final"], nets.head)
        groups = unfreeze_top(nets, cfg.unfreeze_top)
        _log(f"fine-tuning layer groups {', '.join(groups)} at learning rate "
             f"{cfg.learning_rate * FINE_TUNE_LR_FACTOR:g}")
        _fit_phase(ck, state, nets.full, cfg, cfg.learning_rate * FINE_TUNE_LR_FACTOR, weights,
                   lambda epoch: _augmented_epoch(train, spec.preprocess, cfg, epoch),
                   image_dataset(val, spec.preprocess, cfg))
    ck.load_variables(state["files"]["head_final"], nets.head)
    if "full_final" in state["files"]:
        ck.load_variables(state["files"]["full_final"], nets.full)

    evaluated = evaluate(nets.full, val, classes, spec.preprocess, cfg)
    metrics = {"val_accuracy": evaluated.pop("val_accuracy"), "classes": classes,
               "train_images": len(train), "val_images": evaluated.pop("val_images"),
               "skipped_images": len(split["skipped"]), "epochs": _epochs_run(state),
               "best_epochs": state["best_epochs"], "sessions": state["sessions"], **evaluated,
               "skipped": split["skipped"], "history": state["history"]}
    _write_bundle(cfg, nets.full, classes, spec, metrics, time.monotonic() - started)
    shutil.rmtree(ck.dir, ignore_errors=True)
    return FinetuneSummary(cfg.bundle, classes, len(train), len(val), len(split["skipped"]),
                           metrics["val_accuracy"], metrics["epochs"], state["sessions"] > 1,
                           time.monotonic() - started)


def _check_resumable(state: dict, cfg: FinetuneConfig, fingerprint: str) -> None:
    if state.get("version") != STATE_VERSION:
        raise ConfigError(f"{cfg.bundle}: checkpoint format {state.get('version')} is not "
                          f"{STATE_VERSION}; start a new bundle")
    changed = {k: (v, state["params"].get(k)) for k, v in cfg.result_params().items()
               if state["params"].get(k) != v}
    if changed:
        diffs = ", ".join(f"{k}={now!r} (interrupted run: {was!r})" for k, (now, was) in changed.items())
        raise ConfigError(f"--resume needs the interrupted run's options; changed: {diffs}")
    if state["fingerprint"] != fingerprint:
        raise ConfigError("the training data changed since the interrupted run (files, labels, "
                          "sizes or mtimes differ); start a new bundle")


def _prepare_features(ck: Checkpoints, cfg: FinetuneConfig, classes, examples, pre, extract,
                      fingerprint: str) -> dict:
    """Read DATA once through the labeling reader, split it, compute the cached features."""
    t0 = time.monotonic()
    _log(f"reading {len(examples)} images in {len(classes)} classes ({', '.join(classes)})")
    plain, kept, skipped = read_plain_features(examples, classes, extract, pre, cfg)
    for s in skipped:
        _log(f"skipped unreadable {s['image_id']}: {s['error_kind']}: {s['error']}")
    labels = np.array([e.label for e in kept], np.int64)
    _check_class_sizes(classes, labels, skipped)
    train_idx, val_idx = stratified_split(labels, cfg.val_split, cfg.seed)
    train = [kept[i] for i in train_idx]
    xs, ys = [plain[train_idx]], [labels[train_idx]]
    for copy in range(1, cfg.augment_copies + 1):
        x, y = dataset_features(image_dataset(train, pre, cfg, view=copy), extract)
        xs.append(x)
        ys.append(y)
    _log(f"features of {len(kept)} images + {cfg.augment_copies} augmented views of "
         f"{len(train)} training images in {time.monotonic() - t0:.1f}s")
    files = {
        "features": ck.save_arrays("features.npz", train_x=np.concatenate(xs),
                                   train_y=np.concatenate(ys), val_x=plain[val_idx],
                                   val_y=labels[val_idx]),
        "split": "split.json",
    }
    bundle.write_json(ck.path("split.json"), {
        "train": [dataclasses.astuple(e) for e in train],
        "val": [dataclasses.astuple(kept[i]) for i in val_idx],
        "skipped": skipped,
    })
    state = {"version": STATE_VERSION, "params": cfg.result_params(), "fingerprint": fingerprint,
             "phase": "head", "epoch": 0, "best_epoch": 0, "best_val_loss": None, "wait": 0,
             "best_epochs": {}, "history": [], "sessions": 1, "files": files}
    ck.commit(state)
    return state


def _shuffled(x: np.ndarray, y: np.ndarray, cfg: FinetuneConfig, epoch: int):
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(y))
    return x[order], y[order]


def _augmented_epoch(train: list[Example], pre: Preprocess, cfg: FinetuneConfig, epoch: int):
    """This epoch's training images in a seeded order, each a fresh augmented view."""
    order = np.random.default_rng([cfg.seed, 1000 + epoch]).permutation(len(train))
    return image_dataset([train[i] for i in order], pre, cfg, view=cfg.augment_copies + epoch)


def _fit_phase(ck: Checkpoints, state: dict, model, cfg: FinetuneConfig, learning_rate: float,
               weights: dict, epoch_data, validation) -> None:
    """Train state['phase'] epoch by epoch from state['epoch'], checkpointing each epoch;
    early stopping keeps the weights of the best validation loss. Advances state['phase']."""
    phase = state["phase"]
    _compile(model, learning_rate)
    if state["epoch"]:
        ck.load_variables(state["files"]["last"], model, model.optimizer)
    while state["epoch"] < cfg.epochs and state["wait"] < cfg.patience:
        epoch = state["epoch"] + 1
        t0 = time.monotonic()
        data = epoch_data(epoch)
        x, y = data if isinstance(data, tuple) else (data, None)
        fit = model.fit(x, y, batch_size=cfg.batch_size if y is not None else None, epochs=1,
                        shuffle=False, class_weight=weights, validation_data=validation, verbose=0)
        record = {"phase": phase, "epoch": epoch, "session": state["sessions"],
                  "seconds": round(time.monotonic() - t0, 2),
                  **{k: float(v[-1]) for k, v in fit.history.items()}}
        improved = state["best_val_loss"] is None or record["val_loss"] < state["best_val_loss"]
        files = dict(state["files"], last=ck.save_variables(f"{phase}-epoch{epoch:04d}.npz",
                                                            model, model.optimizer))
        if improved:
            files["best"] = ck.save_variables(f"{phase}-best{epoch:04d}.npz", model)
        state.update(epoch=epoch, files=files, history=state["history"] + [record],
                     best_epoch=epoch if improved else state["best_epoch"],
                     best_val_loss=record["val_loss"] if improved else state["best_val_loss"],
                     wait=0 if improved else state["wait"] + 1)
        ck.commit(state)
        _log(f"{phase} epoch {epoch}/{cfg.epochs}: loss {record['loss']:.4f} "
             f"accuracy {record['accuracy']:.3f} val_loss {record['val_loss']:.4f} "
             f"val_accuracy {record['val_accuracy']:.3f} ({record['seconds']:.1f}s)")
    ck.load_variables(state["files"]["best"], model)
    _log(f"{phase} phase: best val_loss {state['best_val_loss']:.4f} at epoch {state['best_epoch']}")
    final = ck.save_variables(f"{'head' if phase == 'head' else 'full'}_final.npz", model)
    files = {k: v for k, v in state["files"].items() if k not in ("last", "best")}
    files[f"{'head' if phase == 'head' else 'full'}_final"] = final
    following = "finetune" if phase == "head" and cfg.unfreeze_top else "done"
    state.update(phase=following, epoch=0, best_epoch=0, best_val_loss=None, wait=0, files=files,
                 best_epochs={**state["best_epochs"], phase: state["best_epoch"]})
    ck.commit(state)


def _epochs_run(state: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in state["history"]:
        counts[record["phase"]] = max(counts.get(record["phase"], 0), record["epoch"])
    return counts


# ---- evaluation and the bundle ---------------------------------------------------------------

def evaluate(model, val: list[Example], classes: list[str], pre: Preprocess,
             cfg: FinetuneConfig) -> dict:
    """Label the validation images exactly as `pipeline label` does and score the result."""
    from .reader import ImageReader
    from .runtime import KerasPredictor

    predict = KerasPredictor(model).predict
    by_id = {ex.image_id: ex for ex in val}
    truth, predicted, rows = [], [], []
    for batch in ImageReader(map(_ref, val), pre, cfg.batch_size, cfg.max_pixels,
                             cfg.max_file_bytes):
        if not batch.refs:
            continue
        probs = predict(batch.images)
        for ref, p in zip(batch.refs, probs):
            ex, best = by_id[ref.image_id], int(np.argmax(p))
            truth.append(ex.label)
            predicted.append(best)
            rows.append({"image_id": ex.image_id, "path": ex.path, "label": classes[ex.label],
                         "predicted": classes[best], "score": float(p[best])})
    return {**score(np.array(truth, np.int64), np.array(predicted, np.int64), classes),
            "val_images": len(rows), "validation": rows}


def score(truth: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class precision/recall (null when undefined), confusion matrix."""
    k = len(classes)
    matrix = np.zeros((k, k), np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    per_class = {}
    for c, name in enumerate(classes):
        predicted_c, actual_c = matrix[:, c].sum(), matrix[c].sum()
        per_class[name] = {
            "precision": float(matrix[c, c] / predicted_c) if predicted_c else None,
            "recall": float(matrix[c, c] / actual_c) if actual_c else None,
            "support": int(actual_c),
        }
    accuracy = float(np.trace(matrix) / matrix.sum()) if matrix.sum() else 0.0
    return {"val_accuracy": accuracy, "per_class": per_class,
            "confusion_matrix": {"rows": "true class", "columns": "predicted class",
                                 "classes": classes, "matrix": matrix.tolist()}}


def _write_bundle(cfg: FinetuneConfig, model, classes: list[str], spec, metrics: dict,
                  seconds: float) -> None:
    info = {
        "base_model": spec.name,
        "base_weights_sha256": spec.weights_sha256,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "training": {**dataclasses.asdict(cfg), "data": os.path.abspath(cfg.data)},
        "train_seconds": round(seconds, 1),
        "pipeline_version": __version__,
    }
    bundle.save(cfg.bundle, model, Labels(tuple(classes), tuple(classes)), spec.preprocess,
                metrics, info)
