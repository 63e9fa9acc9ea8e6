"""EfficientNet-Lite as a Keras functional model, with weight import from lukemelas-named
PyTorch state dicts (TF "same" padding, BN eps 1e-3, ReLU6, no squeeze-excite, fixed stem/head).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BN_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


# EfficientNet-B0 stages, shared by every Lite variant before width/depth scaling.
_B0_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)

# name -> (width multiplier, depth multiplier, resolution)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
    "efficientnet_lite3": (1.2, 1.4, 280),
    "efficientnet_lite4": (1.4, 1.8, 300),
}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def _block_plan(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expand, filters_in, filters_out) for every block, in order."""
    plan = []
    last = len(_B0_STAGES) - 1
    for i, st in enumerate(_B0_STAGES):
        fixed = i in (0, last)  # Lite keeps the first and last stage's depth
        repeats = st.repeats if fixed else int(math.ceil(depth * st.repeats))
        f_in, f_out = _round_filters(st.filters_in, width), _round_filters(st.filters_out, width)
        if i == 0:
            f_in = STEM_FILTERS
        for r in range(repeats):
            plan.append((st.kernel, st.stride if r == 0 else 1, st.expand,
                         f_in if r == 0 else f_out, f_out))
    return plan


def build(name: str = "efficientnet_lite0", num_classes: int = 1000, dropout: float = 0.2,
          classifier_activation: str | None = "softmax"):
    """The Keras model: float input in [-1, 1] (already normalized), class probabilities out."""
    import keras
    from keras import layers

    width, depth, size = VARIANTS[name]
    inputs = keras.Input((size, size, 3), name="image")
    x = layers.Conv2D(STEM_FILTERS, 3, 2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu6")(x)
    for i, (kernel, stride, expand, f_in, f_out) in enumerate(_block_plan(width, depth)):
        x = _mbconv(x, f"block{i}", kernel, stride, expand, f_in, f_out)
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="head_bn")(x)
    x = layers.ReLU(6.0, name="head_relu6")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    # float32 under a mixed precision policy too: softmax in float16 loses small probabilities
    outputs = layers.Dense(num_classes, activation=classifier_activation, dtype="float32",
                           name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def _mbconv(x, prefix, kernel, stride, expand, f_in, f_out):
    from keras import layers

    shortcut = x
    if expand != 1:
        x = layers.Conv2D(f_in * expand, 1, padding="same", use_bias=False,
                          name=f"{prefix}_expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}_expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{prefix}_expand_relu6")(x)
    x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False,
                               name=f"{prefix}_dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}_dw_bn")(x)
    x = layers.ReLU(6.0, name=f"{prefix}_dw_relu6")(x)
    x = layers.Conv2D(f_out, 1, padding="same", use_bias=False, name=f"{prefix}_project_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}_project_bn")(x)
    if stride == 1 and f_in == f_out:
        x = layers.Add(name=f"{prefix}_add")([shortcut, x])
    return x


def _torch_names(keras_layer: str) -> str:
    """Keras layer name -> lukemelas PyTorch module name."""
    fixed = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head",
             "head_bn": "_bn1", "predictions": "_fc"}
    if keras_layer in fixed:
        return fixed[keras_layer]
    block, _, part = keras_layer.partition("_")
    index = block.removeprefix("block")
    torch_part = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dwconv": "_depthwise_conv",
                  "dw_bn": "_bn1", "project_conv": "_project_conv", "project_bn": "_bn2"}[part]
    return f"_blocks.{index}.{torch_part}"


def import_torch_weights(model, state: dict[str, np.ndarray]) -> None:
    """Copy a lukemelas state dict into the Keras model; every tensor must be used once."""
    from keras import layers

    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise ValueError(f"weights file lacks {key}")
        used.add(key)
        return state[key]

    for layer in model.layers:
        if not layer.weights:
            continue
        t = _torch_names(layer.name)
        if isinstance(layer, layers.DepthwiseConv2D):
            layer.set_weights([take(f"{t}.weight").transpose(2, 3, 0, 1)])
        elif isinstance(layer, layers.Conv2D):
            layer.set_weights([take(f"{t}.weight").transpose(2, 3, 1, 0)])
        elif isinstance(layer, layers.BatchNormalization):
            layer.set_weights([take(f"{t}.weight"), take(f"{t}.bias"),
                               take(f"{t}.running_mean"), take(f"{t}.running_var")])
        elif isinstance(layer, layers.Dense):
            layer.set_weights([take(f"{t}.weight").T, take(f"{t}.bias")])
        else:
            raise ValueError(f"no weight mapping for layer {layer.name}")
    unused = {k for k in state if not k.endswith("num_batches_tracked")} - used
    if unused:
        raise ValueError(f"weights file has tensors the model does not use: {sorted(unused)[:5]}")
