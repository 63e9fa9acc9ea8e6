"""What the network sees of each training image: the labeling reader's own view (features of
every readable image, and the unreadable ones), and seeded augmented views (flip, small crop)."""
from __future__ import annotations

import functools
import os

import numpy as np

from ..types import Preprocess
from .config import FinetuneConfig
from .data import Example

AUGMENT_MIN_SCALE = 0.8  # a random crop keeps 80-100% of the labeling crop's side


def read_plain_features(examples: list[Example], classes: list[str], extract, pre: Preprocess,
                        cfg: FinetuneConfig) -> tuple[np.ndarray, list[Example], list[dict]]:
    """Features of every readable image as labeling reads it, and the unreadable ones (skipped)."""
    from ..reader import ImageReader

    by_id = {ex.image_id: ex for ex in examples}
    features, kept, skipped = [], [], []
    for batch in ImageReader((ex.ref for ex in examples), pre, cfg.batch_size,
                             cfg.read_limits()):
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

    from ..reader import load_image

    n = len(examples)
    keys = np.arange(n, dtype=np.int64) + (view or 0) * n
    paths = [os.fsencode(ex.path) for ex in examples]
    labels = np.array([ex.label for ex in examples], np.int64)

    @tf.autograph.experimental.do_not_convert  # as in the labeling reader: explicit tf.cond
    def plain(path, label, key):
        return load_image(path, pre, cfg.max_pixels)[0], label

    window = functools.partial(random_window, crop_fraction=pre.crop_fraction)

    @tf.autograph.experimental.do_not_convert
    def augmented(path, label, key):
        u = tf.random.stateless_uniform([4], seed=tf.stack([tf.constant(cfg.seed, tf.int64), key]))
        image = load_image(path, pre, cfg.max_pixels, window=window, params=u)[0]
        image = tf.cond(u[3] < 0.5, lambda: tf.image.flip_left_right(image), lambda: image)
        return image, label

    options = tf.data.Options()
    options.deterministic = True
    return (tf.data.Dataset.from_tensor_slices((paths, labels, keys))
            .map(plain if view is None else augmented, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(cfg.batch_size)
            .prefetch(tf.data.AUTOTUNE)
            .with_options(options))


def random_window(height: int, width: int, orientation: int, u: np.ndarray,
                  crop_fraction: float | None) -> tuple[int, int, int, int]:
    """A square (or, without a crop policy, same-aspect) window 80-100% of the labeling crop's
    side, placed at random inside it; u holds uniform float32 numbers in [0, 1) (float32
    arithmetic, as the graph computed it before)."""
    from ..reader import crop_window

    top0, left0, side_h, side_w = crop_window(height, width, crop_fraction, orientation)
    f = np.float32
    scale = f(AUGMENT_MIN_SCALE) + f(1.0 - AUGMENT_MIN_SCALE) * f(u[0])
    h = max(1, int(scale * f(side_h)))
    w = max(1, int(scale * f(side_w)))
    return (top0 + int(f(u[1]) * f(side_h - h + 1)), left0 + int(f(u[2]) * f(side_w - w + 1)), h, w)


def dataset_features(dataset, extract) -> tuple[np.ndarray, np.ndarray]:
    features, labels = [], []
    for images, batch_labels in dataset.as_numpy_iterator():
        features.append(extract(images))
        labels.append(batch_labels)
    return np.concatenate(features), np.concatenate(labels)
