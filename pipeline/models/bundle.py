"""Fine-tuned model bundles: the directory `pipeline finetune` writes and `label --model` reads.

    BUNDLE/model.keras       the Keras model: preprocessed image in, class probabilities out
          /labels.json       {"ids": [...], "names": [...]}: output index -> class
          /preprocess.json   the Preprocess fields it was trained with (its base model's)
          /metrics.json      validation accuracy, per-class precision/recall, confusion matrix,
                             the validation images and the skipped unreadable ones
          /bundle.json       format version, base model, created_at, training config
          /checkpoints/      epoch checkpoints while training runs (removed when it finishes)

Every file is written under a temp name and renamed; model.keras comes last, so a directory
without it is an unfinished run, never a bundle that looks complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from .. import atomic
from ..exitcodes import ConfigError
from ..types import Labels, ModelRequest, ModelSpec, Preprocess
from .base import file_sha256

FORMAT = "pipeline-finetune-bundle"
FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
PREPROCESS_FILE = "preprocess.json"
METRICS_FILE = "metrics.json"
INFO_FILE = "bundle.json"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"  # inside CHECKPOINT_DIR


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (see atomic)."""
    atomic.write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"))


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save(directory: str, model, labels: Labels, preprocess: Preprocess, metrics: dict,
         info: dict) -> None:
    """Write a complete bundle into `directory` (which exists); the model file goes last."""
    write_json(os.path.join(directory, LABELS_FILE), {"ids": list(labels.ids), "names": list(labels.names)})
    write_json(os.path.join(directory, PREPROCESS_FILE), dataclasses.asdict(preprocess))
    write_json(os.path.join(directory, METRICS_FILE), metrics)
    write_json(os.path.join(directory, INFO_FILE),
               {"format": FORMAT, "format_version": FORMAT_VERSION, "model_file": MODEL_FILE, **info})
    with atomic.replacing(os.path.join(directory, MODEL_FILE), suffix=".keras") as tmp:
        model.save(tmp)  # Keras wants the suffix


def is_bundle(path: str) -> bool:
    """True for a directory `pipeline finetune` wrote, finished or not (see is_complete)."""
    return (os.path.isfile(os.path.join(path, INFO_FILE))
            or os.path.isfile(os.path.join(path, CHECKPOINT_DIR, STATE_FILE)))


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INFO_FILE)) and os.path.isfile(os.path.join(path, MODEL_FILE))


def bundle_name(path: str) -> str:
    """The model name a bundle's rows carry: its directory name."""
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def read_labels(path: str) -> Labels:
    data = read_json(os.path.join(path, LABELS_FILE))
    ids, names = data.get("ids"), data.get("names", data.get("ids"))
    if not ids or len(ids) != len(names):
        raise ConfigError(f"{path}/{LABELS_FILE} needs 'ids' and 'names' lists of equal length")
    return Labels(tuple(map(str, ids)), tuple(map(str, names)))


def read_preprocess(path: str) -> Preprocess:
    data = read_json(os.path.join(path, PREPROCESS_FILE))
    known = {f.name for f in dataclasses.fields(Preprocess)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}/{PREPROCESS_FILE} has unknown field(s): {', '.join(unknown)}")
    for key in ("mean", "std"):
        if key in data:
            data[key] = tuple(float(v) for v in data[key])
    return Preprocess(**data)


def bundle_spec(path: str, request: ModelRequest) -> ModelSpec:
    """The ModelSpec of a finished bundle: its labels, preprocessing and Keras model."""
    if request.weights:
        raise ConfigError(f"--weights does not apply to a fine-tuned bundle ({path} has its own model)")
    if not is_complete(path):
        raise ConfigError(f"{path} is an unfinished fine-tuning run (no {MODEL_FILE} yet); "
                          f"finish it with `pipeline finetune DATA {path} --resume`")
    try:
        info = read_json(os.path.join(path, INFO_FILE))
        if info.get("format") != FORMAT or info.get("format_version", 0) > FORMAT_VERSION:
            raise ConfigError(f"{path}/{INFO_FILE}: not a bundle format this version reads "
                              f"({info.get('format')} v{info.get('format_version')})")
        labels, preprocess = read_labels(path), read_preprocess(path)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a readable bundle: {e}") from e
    model_path = os.path.join(path, MODEL_FILE)
    return ModelSpec(bundle_name(path), preprocess, labels, f"bundle {os.path.abspath(path)}",
                     file_sha256(model_path), f"{__name__}:load", (model_path, len(labels)))


def load(model_path: str, classes: int):
    """The bundle's Keras model (a ModelSpec's loader: called by name, see types.ModelSpec)."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    if model.output_shape[-1] != classes:
        raise ConfigError(f"{model_path} has {model.output_shape[-1]} outputs but "
                          f"{LABELS_FILE} lists {classes} classes")
    return model
