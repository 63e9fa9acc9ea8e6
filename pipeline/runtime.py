"""Inference backends: a Predictor turns a batch of images into probabilities.

A batch is either model-ready float32 input or uint8 pixels (the resized crop), which the
predictor normalizes itself with pixels.normalize: Keras as the model's first op, on the
model's device, LiteRT in numpy before the invoke. Each predictor's `feed` tells the reader
which of the two to hand it, and whether as TensorFlow tensors (prefetched to which device).

`keras` runs the Keras model in a tf.function (any device; mixed precision and one replica per
GPU on GPU hosts). `litert` converts the Keras model once to a LiteRT flatbuffer (float32, or
int8 with `--precision int8`: see quantize.py), caches it next to the converted weights, and
runs it on the CPU with the XNNPACK delegate.
"""
from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from . import atomic, devices, pixels, quantize
from .devices import Plan
from .models import features
from .tfimport import muted_output
from .types import Feed, ModelSpec, Preprocess

log = logging.getLogger(__name__)

# Images per LiteRT invoke. One image at a time is the fastest XNNPACK setting measured on a
# 2-core host (the activations stay in cache); the reader's batches are split into these.
LITERT_INVOKE_BATCH = 1


class Predictor(Protocol):
    name: str
    batch_size: int  # images per reader batch this predictor is planned for
    feed: Feed  # what the reader hands it

    def predict(self, images) -> np.ndarray: ...

    # Only for a spec with embedding_width (--embeddings): probabilities and the pooled
    # features (float32, not normalized), from one forward pass.
    def predict_with_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def load(spec: ModelSpec, plan: Plan) -> Predictor:
    """The Predictor `plan` describes (devices.plan, made once per run)."""
    if plan.runtime == "litert":
        return load_litert(spec, plan.cache_dir, plan.batch_size, plan.precision, feed=plan.feed)
    return load_keras(spec, plan)


# ---- Keras -----------------------------------------------------------------------------

class KerasPredictor:
    """The Keras model in a compiled tf.function, inference mode, on one device.

    Takes numpy arrays or TensorFlow tensors (the reader's batches as tf.data made them, already
    on `device` when prefetched there); uint8 pixels are normalized inside the tf.function, so
    only uint8 crosses to the device.
    """

    name = "keras"

    def __init__(self, model, batch_size: int = devices.CPU_BATCH_SIZE, device: str | None = None,
                 pre: Preprocess | None = None, feed: str = "float32"):
        import tensorflow as tf

        if feed == "uint8" and pre is None:
            raise ValueError("a uint8 feed needs the model's Preprocess to normalize with")
        self._model = model
        self._device = device
        self.batch_size = batch_size
        self.feed = Feed(feed, tensors=True, device=device)

        def call(x):
            if x.dtype == tf.uint8:  # decided when traced: one graph per input dtype
                if pre is None:
                    raise ValueError("uint8 pixels need the model's Preprocess to normalize with")
                x = pixels.normalize(x, pre)
            return model(x, training=False)

        self._call = tf.function(call, reduce_retracing=True)

    def predict(self, images) -> np.ndarray:
        if len(images) == 0:
            shape = self._model.output_shape
            classes = (shape[features.PROBABILITIES] if isinstance(shape, dict) else shape)[-1]
            return np.zeros((0, classes), np.float32)
        with _device_scope(self._device):
            out = self._call(images)
        return np.asarray(out[features.PROBABILITIES] if isinstance(out, dict) else out,
                          dtype=np.float32)

    def predict_with_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a model from features.two_outputs."""
        with _device_scope(self._device):
            out = self._call(images)
        return (np.asarray(out[features.PROBABILITIES], np.float32),
                np.asarray(out[features.EMBEDDING], np.float32))


class ReplicatedPredictor:
    """One predictor per device: a batch is split into contiguous slices run concurrently
    (TensorFlow releases the GIL), and the results are joined back in order."""

    def __init__(self, replicas: Sequence[Predictor], batch_size: int):
        self._replicas = list(replicas)
        self.name = self._replicas[0].name
        self.batch_size = batch_size
        # batches stay on the host: each replica copies its own slice to its device
        self.feed = Feed(self._replicas[0].feed.dtype, self._replicas[0].feed.tensors, None)
        self._pool = ThreadPoolExecutor(len(self._replicas), thread_name_prefix="replica")

    def predict(self, images) -> np.ndarray:
        bounds = np.array_split(np.arange(len(images)), len(self._replicas))
        slices = [images[b[0]:b[-1] + 1] if len(b) else images[:0] for b in bounds]
        results = self._pool.map(lambda rs: rs[0].predict(rs[1]), zip(self._replicas, slices))
        return np.concatenate(list(results))

    def predict_with_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slices = np.array_split(images, len(self._replicas))
        results = list(self._pool.map(lambda rs: rs[0].predict_with_features(rs[1]),
                                      zip(self._replicas, slices)))
        return (np.concatenate([probs for probs, _ in results]),
                np.concatenate([feats for _, feats in results]))


def load_keras(spec: ModelSpec, plan: Plan) -> Predictor:
    """Build the model under plan.dtype_policy, one replica per planned device."""
    if len(plan.devices) <= 1:
        device = plan.devices[0] if plan.devices else None
        return KerasPredictor(_build_keras(spec, plan.dtype_policy, device), plan.batch_size, device,
                              spec.preprocess, plan.feed)
    per_replica = -(-plan.batch_size // len(plan.devices))
    replicas = [KerasPredictor(_build_keras(spec, plan.dtype_policy, d), per_replica, d,
                               spec.preprocess, plan.feed)
                for d in plan.devices]
    return ReplicatedPredictor(replicas, plan.batch_size)


def _build_keras(spec: ModelSpec, dtype_policy: str, device: str | None):
    """The policy must be global while the layers are created: Keras reads it at construction.
    (The model's output layer is float32 under every policy, so probabilities stay float32.)"""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype_policy)
    try:
        with _device_scope(device):
            return _keras_model(spec)
    finally:
        keras.config.set_dtype_policy(previous)


def _keras_model(spec: ModelSpec):
    """The spec's Keras model; with embedding_width, its two-output form."""
    model = spec.load_keras()
    return model if spec.embedding_width is None else features.two_outputs(model, spec.name)


def _device_scope(device: str | None):
    if device is None:
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.device(device)


# ---- LiteRT ----------------------------------------------------------------------------

class LiteRTPredictor:
    """A LiteRT flatbuffer on the CPU with the XNNPACK delegate, one thread per core. uint8
    pixels are normalized in numpy before each invoke."""

    name = "litert"

    def __init__(self, flatbuffer: bytes, batch_size: int = devices.CPU_BATCH_SIZE,
                 num_threads: int | None = None, invoke_batch: int = LITERT_INVOKE_BATCH,
                 pre: Preprocess | None = None, feed: str = "float32"):
        if feed == "uint8" and pre is None:
            raise ValueError("a uint8 feed needs the model's Preprocess to normalize with")
        self.batch_size = batch_size
        self.feed = Feed(feed)
        self._pre = pre
        self._invoke_batch = invoke_batch
        self._interpreter = _make_interpreter(flatbuffer, num_threads or devices.cpu_threads())
        self._input = self._interpreter.get_input_details()[0]
        named = _output_indices(self._interpreter)  # a two-output flatbuffer: by name
        first = self._interpreter.get_output_details()[0]
        self._probabilities, self._classes = named.get(
            features.PROBABILITIES, (first["index"], int(first["shape"][-1])))
        self._embedding = named.get(features.EMBEDDING)  # (index, width) or None
        self._allocated: tuple[int, ...] | None = None

    def predict(self, images) -> np.ndarray:
        images = np.asarray(images)
        out = np.empty((len(images), self._classes), np.float32)
        for start in range(0, len(images), self._invoke_batch):
            chunk = images[start:start + self._invoke_batch]
            out[start:start + len(chunk)] = self._invoke(self._model_input(chunk))
        return out

    def predict_with_features(self, images) -> tuple[np.ndarray, np.ndarray]:
        """For a flatbuffer converted from features.two_outputs (outputs found by name)."""
        images = np.asarray(images)
        if self._embedding is None:
            raise ValueError("this flatbuffer has no embedding output")
        index, width = self._embedding
        probs = np.empty((len(images), self._classes), np.float32)
        feats = np.empty((len(images), width), np.float32)
        for start in range(0, len(images), self._invoke_batch):
            chunk = images[start:start + self._invoke_batch]
            probs[start:start + len(chunk)] = self._invoke(self._model_input(chunk))
            feats[start:start + len(chunk)] = self._interpreter.get_tensor(index)
        return probs, feats

    def _model_input(self, chunk: np.ndarray) -> np.ndarray:
        if chunk.dtype == np.uint8:
            if self._pre is None:
                raise ValueError("uint8 pixels need the model's Preprocess to normalize with")
            return pixels.normalize_numpy(chunk, self._pre)
        return chunk

    def _invoke(self, chunk: np.ndarray) -> np.ndarray:
        if self._allocated != chunk.shape:
            self._interpreter.resize_tensor_input(self._input["index"], chunk.shape)
            with muted_output():  # "Created TensorFlow Lite XNNPACK delegate for CPU."
                self._interpreter.allocate_tensors()
            self._allocated = chunk.shape
        self._interpreter.set_tensor(self._input["index"], np.ascontiguousarray(chunk, np.float32))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._probabilities)


def _output_indices(interpreter) -> dict[str, tuple[int, int]]:
    """Signature output name -> (tensor index, width); empty without a signature."""
    try:
        details = interpreter.get_signature_runner().get_output_details()
    except (ValueError, RuntimeError):
        return {}
    return {name: (int(d["index"]), int(d["shape"][-1])) for name, d in details.items()}


def _make_interpreter(flatbuffer: bytes, num_threads: int):
    """LiteRT's own interpreter (ai-edge-litert); tf.lite.Interpreter where it is not installed.
    Both apply the XNNPACK delegate by default."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter(model_content=flatbuffer, num_threads=num_threads)


def load_litert(spec: ModelSpec, cache_dir: str, batch_size: int = devices.CPU_BATCH_SIZE,
                precision: str = "float32", **options) -> LiteRTPredictor:
    """LiteRT from the cached flatbuffer; converted from the Keras model on first use (a cache
    that does not load is rebuilt, an unwritable cache only costs the conversion next time).
    `precision`: float32, or int8 (full-integer, calibrated on the shipped photos)."""
    path = litert_cache_path(spec, cache_dir, precision)
    options.setdefault("pre", spec.preprocess)
    if os.path.isfile(path):
        try:
            return LiteRTPredictor(_read(path), batch_size, **options)
        except (ValueError, RuntimeError):
            os.unlink(path)
    log.info(f"converting {spec.name} to LiteRT {precision} for the CPU runtime (first run only; "
             f"cached in {path})")
    if precision == "int8":  # run.label refuses --embeddings with int8
        flatbuffer = quantize.convert_int8(spec.load_keras(), spec.preprocess)
    else:
        flatbuffer = convert_to_litert(_keras_model(spec))
    _cache(path, flatbuffer)
    return LiteRTPredictor(flatbuffer, batch_size, **options)


def litert_cache_path(spec: ModelSpec, cache_dir: str, precision: str = "float32") -> str:
    """Next to the converted Keras weights; the key names everything the flatbuffer depends on
    (int8: also the calibration photos and the preprocessing that feeds them)."""
    import tensorflow as tf

    key = f"{spec.name}-{spec.weights_sha256[:16]}-tf{tf.__version__}-dynbatch"
    if spec.embedding_width is not None:  # a second output: another flatbuffer
        key += "-embedding"
    if precision == "int8":
        key += f"-int8-cal{quantize.calibration_id(spec.preprocess)}"
    return os.path.join(cache_dir, "models", f"{key}.tflite")


def convert_to_litert(model) -> bytes:
    """Keras model -> LiteRT flatbuffer (float32, any batch size)."""
    import tensorflow as tf

    with muted_output(stdout=True):  # the converter prints its SavedModel and MLIR passes
        return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _cache(path: str, flatbuffer: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(flatbuffer)

    atomic.write_cache(path, write)


@dataclass(frozen=True)
class Scores:
    """A batch's top-k (indices into the model's labels and their probabilities, best first),
    and with --embeddings the L2-normalized pooled features of the same forward pass."""

    top_idx: np.ndarray  # [n, k]
    top_scores: np.ndarray  # [n, k]
    embeddings: np.ndarray | None  # [n, embedding_width] float32, or None without --embeddings


def score(predictor: Predictor, images, spec: ModelSpec, k: int) -> Scores:
    """Top-k (and the embeddings, if `spec` has them) of every image in `images`; what every
    engine computes, whichever process holds the model. An empty batch gives empty arrays."""
    width = spec.embedding_width
    embeddings = None
    if len(images) == 0:
        probs = np.zeros((0, len(spec.labels)), np.float32)
        embeddings = None if width is None else np.zeros((0, width), np.float32)
    elif width is None:
        probs = predictor.predict(images)
    else:
        probs, features = predictor.predict_with_features(images)
        embeddings = l2_normalized(features)
    idx, scores = top_k(probs, k)
    return Scores(idx, scores, embeddings)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k best classes per row, best first.

    Same order as keras' decode_predictions (`argsort()[-k:][::-1]`), ties included.
    """
    k = min(k, probs.shape[-1])
    idx = np.argsort(probs, axis=-1)[:, -k:][:, ::-1]
    return idx, np.take_along_axis(probs, idx, axis=-1)


def l2_normalized(features: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (a zero row stays zero), so a dot product is the cosine."""
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)
