"""The networks: the frozen base's pooled features, a new head (dropout + softmax Dense) on
them, and the full model (base + head) the bundle holds; which base layers fine-tuning unfreezes."""
from __future__ import annotations

from dataclasses import dataclass

from ..exitcodes import ConfigError
from ..models.features import feature_tensor
from .config import FinetuneConfig


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


def compile_for_training(model, learning_rate: float) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=False)
