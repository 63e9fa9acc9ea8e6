"""The run: lock BUNDLE, compute the cached features, train the head (then, with --unfreeze-top,
the top of the base), checkpointing every epoch, evaluate, write the bundle."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np

from ..exitcodes import ConfigError, FatalError
from ..models import bundle
from ..types import Preprocess
from .config import FinetuneConfig
from .data import Example, check_class_sizes, class_weights, data_fingerprint, read_examples, stratified_split
from .evaluate import evaluate, write_bundle
from .network import build_networks, compile_for_training, unfreeze_top
from .training_checkpoints import EpochCheckpoints, TrainingState
from .views import dataset_features, image_dataset, read_plain_features

log = logging.getLogger(__name__)

FINE_TUNE_LR_FACTOR = 0.1  # unfrozen base layers train at learning_rate x this


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


def finetune(cfg: FinetuneConfig) -> FinetuneSummary:
    """Train, evaluate and write the bundle cfg.bundle; resume it with cfg.resume."""
    from ..store.lock import OutputLocked, flock_directory

    started = time.monotonic()
    classes, examples = read_examples(cfg.data)
    make_bundle_dir(cfg.bundle)
    with contextlib.ExitStack() as held:
        try:  # before any look inside: a live run's checkpoints are its own
            held.enter_context(flock_directory(cfg.bundle, "finetune"))
        except OutputLocked as e:
            raise OutputLocked(f"{cfg.bundle} is being trained by another run: {e}") from None
        try:
            check_bundle_dir(cfg)
        except AlreadyComplete:
            return _summary_of_finished(cfg, started)
        return _train_or_fail(cfg, classes, examples, started)


def make_bundle_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"bundle {path} exists and is not a directory")
    os.makedirs(path, exist_ok=True)


def check_bundle_dir(cfg: FinetuneConfig) -> None:
    """Refuse to touch what BUNDLE holds (--resume continues an interrupted run;
    AlreadyComplete when it finished). Call it holding the bundle's lock."""
    path = cfg.bundle
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


def _train_or_fail(cfg: FinetuneConfig, classes: list[str], examples: list[Example], started: float):
    import tensorflow as tf

    try:
        return _train(cfg, classes, examples, started)
    except tf.errors.OpError as e:  # images were readable in the first pass; one changed since
        first_line = (e.message or str(e)).strip().splitlines()[0]
        raise TrainingFailed(f"{first_line}; completed epochs are kept, fix the data and "
                             f"run again with --resume") from e


def _summary_of_finished(cfg: FinetuneConfig, started: float) -> FinetuneSummary:
    metrics = bundle.read_json(os.path.join(cfg.bundle, bundle.METRICS_FILE))
    log.info(f"{cfg.bundle} is already complete; nothing to resume")
    return FinetuneSummary(cfg.bundle, metrics["classes"], metrics["train_images"],
                           metrics["val_images"], metrics["skipped_images"], metrics["val_accuracy"],
                           metrics["epochs"], True, time.monotonic() - started)


def _train(cfg: FinetuneConfig, classes: list[str], examples: list[Example], started: float):
    import keras

    from .. import models
    from ..runtime import KerasPredictor

    keras.utils.set_random_seed(cfg.seed)
    ck = EpochCheckpoints(cfg.bundle)
    fingerprint = data_fingerprint(classes, examples)
    state = _state_to_continue(ck, cfg, fingerprint)
    spec = models.get(cfg.model_request())
    nets = build_networks(spec.load_keras(), len(classes), cfg)
    if state is None:
        extract = KerasPredictor(nets.extractor).predict
        state = _prepare_features(ck, cfg, classes, examples, spec.preprocess, extract, fingerprint)
    split = bundle.read_json(ck.path(state.files["split"]))
    train, val = (_examples_named(split[part], examples) for part in ("train", "val"))
    _train_phases(ck, state, nets, cfg, train, val, spec.preprocess, len(classes))

    evaluated = evaluate(nets.full, val, classes, spec.preprocess, cfg)
    metrics = {"val_accuracy": evaluated.pop("val_accuracy"), "classes": classes,
               "train_images": len(train), "val_images": evaluated.pop("val_images"),
               "skipped_images": len(split["skipped"]), "epochs": state.epochs_run(),
               "best_epochs": state.best_epochs, "sessions": state.sessions, **evaluated,
               "skipped": split["skipped"], "history": state.history}
    write_bundle(cfg, nets.full, classes, spec, metrics, time.monotonic() - started)
    shutil.rmtree(ck.dir, ignore_errors=True)
    return FinetuneSummary(cfg.bundle, classes, len(train), len(val), len(split["skipped"]),
                           metrics["val_accuracy"], metrics["epochs"], state.sessions > 1,
                           time.monotonic() - started)


def _train_phases(ck: EpochCheckpoints, state: TrainingState, nets, cfg: FinetuneConfig,
                  train: list[Example], val: list[Example], pre: Preprocess, n_classes: int) -> None:
    """The phases state has not finished (head on cached features, then the unfrozen top on
    fresh augmented views); leaves nets holding the final weights."""
    with np.load(ck.path(state.files["features"])) as f:
        features = {k: f[k] for k in f.files}
    weights = class_weights(np.array([e.label for e in train]), n_classes)
    if state.phase == "head":
        _fit_phase(ck, state, nets.head, cfg, cfg.learning_rate, weights,
                   lambda epoch: _shuffled(features["train_x"], features["train_y"], cfg, epoch),
                   (features["val_x"], features["val_y"]))
    if state.phase == "finetune":
        ck.load_variables(state.files["head_final"], nets.head)
        groups = unfreeze_top(nets, cfg.unfreeze_top)
        log.info(f"fine-tuning layer groups {', '.join(groups)} at learning rate "
             f"{cfg.learning_rate * FINE_TUNE_LR_FACTOR:g}")
        _fit_phase(ck, state, nets.full, cfg, cfg.learning_rate * FINE_TUNE_LR_FACTOR, weights,
                   lambda epoch: _augmented_epoch(train, pre, cfg, epoch),
                   image_dataset(val, pre, cfg))
    ck.load_variables(state.files["head_final"], nets.head)
    if "full_final" in state.files:
        ck.load_variables(state.files["full_final"], nets.full)


def _state_to_continue(ck: EpochCheckpoints, cfg: FinetuneConfig, fingerprint: str) -> TrainingState | None:
    """The committed state --resume continues from (checked against cfg and DATA), or None to
    start afresh with an empty checkpoint directory."""
    state = ck.read_state() if cfg.resume else None
    if state is None:
        shutil.rmtree(ck.dir, ignore_errors=True)  # nothing committed in it
    os.makedirs(ck.dir, exist_ok=True)
    if state is not None:
        _check_resumable(state, cfg, fingerprint)
        state.sessions += 1
        log.info(f"resuming {cfg.bundle}: {state.phase} phase after epoch {state.epoch}")
    elif cfg.resume:
        log.info(f"{cfg.bundle} has no checkpoint yet; starting from the beginning")
    return state


def _check_resumable(state: TrainingState, cfg: FinetuneConfig, fingerprint: str) -> None:
    changed = {k: (v, state.params.get(k)) for k, v in cfg.result_params().items()
               if state.params.get(k) != v}
    if changed:
        diffs = ", ".join(f"{k}={now!r} (interrupted run: {was!r})" for k, (now, was) in changed.items())
        raise ConfigError(f"--resume needs the interrupted run's options; changed: {diffs}")
    if state.fingerprint != fingerprint:
        raise ConfigError("the training data changed since the interrupted run (files, labels, "
                          "sizes or mtimes differ); start a new bundle")


def _examples_named(saved: list, examples: list[Example]) -> list[Example]:
    """split.json's [image_id, path, label] entries as the examples just read (the data
    fingerprint already matched, so every one is there)."""
    by_id = {ex.image_id: ex for ex in examples}
    return [by_id[image_id] for image_id, _, _ in saved]


def _prepare_features(ck: EpochCheckpoints, cfg: FinetuneConfig, classes, examples, pre, extract,
                      fingerprint: str) -> TrainingState:
    """Read DATA once through the labeling reader, split it, compute the cached features."""
    t0 = time.monotonic()
    log.info(f"reading {len(examples)} images in {len(classes)} classes ({', '.join(classes)})")
    plain, kept, skipped = read_plain_features(examples, classes, extract, pre, cfg)
    for s in skipped:
        log.info(f"skipped unreadable {s['image_id']}: {s['error_kind']}: {s['error']}")
    labels = np.array([e.label for e in kept], np.int64)
    check_class_sizes(classes, labels, skipped)
    train_idx, val_idx = stratified_split(labels, cfg.val_split, cfg.seed)
    train = [kept[i] for i in train_idx]
    xs, ys = [plain[train_idx]], [labels[train_idx]]
    for copy in range(1, cfg.augment_copies + 1):
        x, y = dataset_features(image_dataset(train, pre, cfg, view=copy), extract)
        xs.append(x)
        ys.append(y)
    log.info(f"features of {len(kept)} images + {cfg.augment_copies} augmented views of "
         f"{len(train)} training images in {time.monotonic() - t0:.1f}s")
    files = {
        "features": ck.save_arrays("features.npz", train_x=np.concatenate(xs),
                                   train_y=np.concatenate(ys), val_x=plain[val_idx],
                                   val_y=labels[val_idx]),
        "split": "split.json",
    }
    bundle.write_json(ck.path("split.json"), {
        "train": [_saved(e) for e in train],
        "val": [_saved(kept[i]) for i in val_idx],
        "skipped": skipped,
    })
    state = TrainingState(params=cfg.result_params(), fingerprint=fingerprint, files=files)
    ck.commit(state)
    return state


def _saved(ex: Example) -> list:
    return [ex.image_id, ex.path, ex.label]


def _shuffled(x: np.ndarray, y: np.ndarray, cfg: FinetuneConfig, epoch: int):
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(y))
    return x[order], y[order]


def _augmented_epoch(train: list[Example], pre: Preprocess, cfg: FinetuneConfig, epoch: int):
    """This epoch's training images in a seeded order, each a fresh augmented view."""
    order = np.random.default_rng([cfg.seed, 1000 + epoch]).permutation(len(train))
    return image_dataset([train[i] for i in order], pre, cfg, view=cfg.augment_copies + epoch)


def _fit_phase(ck: EpochCheckpoints, state: TrainingState, model, cfg: FinetuneConfig,
               learning_rate: float, weights: dict, epoch_data, validation) -> None:
    """Train state.phase epoch by epoch from state.epoch, checkpointing each epoch; early
    stopping keeps the weights of the best validation loss. Advances state.phase."""
    phase = state.phase
    compile_for_training(model, learning_rate)
    if state.epoch:
        ck.load_variables(state.files["last"], model, model.optimizer)
    while state.epoch < cfg.epochs and state.wait < cfg.patience:
        record = _fit_one_epoch(model, cfg, weights, epoch_data, validation, state)
        improved = state.improves(record["val_loss"])
        files = dict(state.files, last=ck.save_variables(f"{phase}-epoch{record['epoch']:04d}.npz",
                                                         model, model.optimizer))
        if improved:
            files["best"] = ck.save_variables(f"{phase}-best{record['epoch']:04d}.npz", model)
        state.record_epoch(record, files, improved)
        ck.commit(state)
        log.info(f"{phase} epoch {record['epoch']}/{cfg.epochs}: loss {record['loss']:.4f} "
             f"accuracy {record['accuracy']:.3f} val_loss {record['val_loss']:.4f} "
             f"val_accuracy {record['val_accuracy']:.3f} ({record['seconds']:.1f}s)")
    ck.load_variables(state.files["best"], model)
    log.info(f"{phase} phase: best val_loss {state.best_val_loss:.4f} at epoch {state.best_epoch}")
    final_role = "head_final" if phase == "head" else "full_final"
    final = ck.save_variables(f"{final_role}.npz", model)
    state.finish_phase(final_role, final, "finetune" if phase == "head" and cfg.unfreeze_top else "done")
    ck.commit(state)


def _fit_one_epoch(model, cfg: FinetuneConfig, weights: dict, epoch_data, validation,
                   state: TrainingState) -> dict:
    epoch = state.epoch + 1
    t0 = time.monotonic()
    data = epoch_data(epoch)
    x, y = data if isinstance(data, tuple) else (data, None)
    fit = model.fit(x, y, batch_size=cfg.batch_size if y is not None else None, epochs=1,
                    shuffle=False, class_weight=weights, validation_data=validation, verbose=0)
    return {"phase": state.phase, "epoch": epoch, "session": state.sessions,
            "seconds": round(time.monotonic() - t0, 2),
            **{k: float(v[-1]) for k, v in fit.history.items()}}
