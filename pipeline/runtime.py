"""Inference backends: a Predictor turns a batch of model-ready images into probabilities."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from .config import RunConfig
from .models.registry import ModelSpec


class Predictor(Protocol):
    name: str

    def predict(self, images: np.ndarray) -> np.ndarray: ...


class KerasPredictor:
    """The Keras model in a compiled tf.function, inference mode."""

    name = "keras"

    def __init__(self, model):
        import tensorflow as tf

        self._model = model
        self._call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self._model.output_shape[-1]), np.float32)
        return np.asarray(self._call(images), dtype=np.float32)


def load(spec: ModelSpec, cfg: RunConfig) -> Predictor:
    """The Predictor for cfg.runtime (only keras so far; auto falls back to keras)."""
    if cfg.runtime == "litert":
        from .config import ConfigError

        raise ConfigError("--runtime litert is not available yet; use keras or auto")
    return KerasPredictor(spec.load_keras())


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k best classes per row, best first.

    Same order as keras' decode_predictions (`argsort()[-k:][::-1]`), ties included.
    """
    k = min(k, probs.shape[-1])
    idx = np.argsort(probs, axis=-1)[:, -k:][:, ::-1]
    return idx, np.take_along_axis(probs, idx, axis=-1)
