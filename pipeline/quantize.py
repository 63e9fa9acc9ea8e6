"""Full-integer (int8) post-training quantization of the LiteRT model.

Weights and activations are int8 (per-channel weights, per-tensor activations) except the
classifier head (the dense layer and the softmax); the model's input and output stay float32, so
the reader and the Predictor interface do not change. The
activation ranges are calibrated on photos the package ships (`pipeline/calibration/`, public
domain / CC0, written by scripts/make_calibration_set.py) and their mirror images, preprocessed
exactly like the model's input: no network, and the same flatbuffer on every host for the same
weights, preprocessing, calibration set and TensorFlow version.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from .tfimport import muted_output
from .types import Preprocess

FLOAT_OPS = ["FULLY_CONNECTED", "SOFTMAX"]  # the classifier head stays float32 (convert_int8)
CALIBRATION_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration")


def calibration_files() -> list[str]:
    return sorted(os.path.join(CALIBRATION_DIR, name) for name in os.listdir(CALIBRATION_DIR)
                  if name.endswith(".jpg"))


def calibration_id(pre: Preprocess) -> str:
    """Names what the activation ranges depend on besides the weights: the calibration photos
    (names and bytes) and the preprocessing that turns them into model input."""
    digest = hashlib.sha256(pre.describe().encode())
    for path in calibration_files():
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:16]


def calibration_images(pre: Preprocess) -> np.ndarray:
    """The calibration photos as model input (the reader's own decode, crop, resize and
    normalization), each followed by its mirror image."""
    from pathlib import Path

    from .reader import ImageReader
    from .sources import local_ref

    refs = [local_ref(os.path.basename(p), Path(p)) for p in calibration_files()]
    batches = list(ImageReader(refs, pre, 64))
    if any(b.errors for b in batches):
        raise RuntimeError(f"a calibration photo in {CALIBRATION_DIR} does not decode: "
                           f"{[e.message for b in batches for e in b.errors]}")
    images = np.concatenate([b.images for b in batches])
    return np.stack([images, images[:, :, ::-1]], axis=1).reshape(-1, *images.shape[1:])


def convert_int8(model, pre: Preprocess) -> bytes:
    """Keras model -> LiteRT flatbuffer with int8 weights and activations, float32 input and
    output (any batch size); XNNPACK runs its int8 operators.

    The classifier head stays float32. An int8 softmax has 256 levels: on the shared sample it
    left about 7 non-zero probabilities per image, ties in 70% of the top-5 lists and sums down
    to 0.66. With int8 logits (a float softmax alone) 17% of the top-5 lists still held tied
    scores, in an arbitrary order; float logits hold none. The head is about 0.3% of the
    model's multiply-adds (1280x1000 for EfficientNet-Lite0)."""
    import tensorflow as tf

    images = calibration_images(pre)

    def representative_dataset():
        for image in images:
            yield [image[None]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    # Selective quantization is offered through the quantization debugger (public API).
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=FLOAT_OPS)
    with muted_output(stdout=True):  # the converter prints its passes and calibration progress
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=representative_dataset, debug_options=options)
        return debugger.get_nondebug_quantized_model()
