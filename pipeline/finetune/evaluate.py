"""The finished model labels the validation images exactly as `pipeline label` would; the
scores and the bundle (see models/bundle.py)."""
from __future__ import annotations

import dataclasses
import datetime as dt
import os

import numpy as np

from .. import __version__
from ..models import bundle
from ..types import Labels, Preprocess
from .config import FinetuneConfig
from .data import Example


def evaluate(model, val: list[Example], classes: list[str], pre: Preprocess,
             cfg: FinetuneConfig) -> dict:
    """Label the validation images exactly as `pipeline label` does and score the result."""
    from ..reader import ImageReader
    from ..runtime import KerasPredictor

    predict = KerasPredictor(model).predict
    by_id = {ex.image_id: ex for ex in val}
    truth, predicted, rows = [], [], []
    for batch in ImageReader((ex.ref for ex in val), pre, cfg.batch_size,
                             cfg.read_limits()):
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


def write_bundle(cfg: FinetuneConfig, model, classes: list[str], spec, metrics: dict,
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
