"""--embeddings: the pooled features a classifier reads, as a second output of the same model.

The features are the input of the final classification Dense layer (before any Dropout):
EfficientNet-Lite0's `avg_pool`, 1280 values. A model without such a layer (MobileNet's 1x1
convolution head, a SavedModel) has none, and asking for embeddings is a usage error.
"""
from __future__ import annotations

import dataclasses

from ..exitcodes import ConfigError
from ..types import ModelSpec
from . import efficientnet_lite

# Output names of the two-output model (the LiteRT signature keeps them)
PROBABILITIES = "probabilities"
EMBEDDING = "embedding"

# Feature widths known without building the network (loader -> width)
_KNOWN_WIDTHS = {"pipeline.models.lite:load_converted": efficientnet_lite.HEAD_FILTERS}


class NoFeatureLayer(ConfigError):
    """The model has no classification Dense layer whose input could be the embedding."""


def feature_tensor(model, name: str | None = None):
    """The pooled features the model's classifier reads: the last Dense layer's input, before
    any Dropout (EfficientNet-Lite0: the output of `avg_pool`). NoFeatureLayer (exit 2) names
    the model if its last layer is not a Dense."""
    from keras import layers

    last = model.layers[-1]
    if not isinstance(last, layers.Dense) or len(last.input.shape) != 2:
        raise NoFeatureLayer(
            f"model {name or model.name} does not end in a Dense classifier (its last layer is "
            f"{last.name}, a {type(last).__name__}), so it has no pooled features to use")
    x = last.input
    while True:
        producer = next((layer for layer in model.layers if layer.output is x), None)
        if not isinstance(producer, layers.Dropout):
            return x
        x = producer.input


def with_embeddings(spec: ModelSpec) -> ModelSpec:
    """`spec` asking the runtime for the embedding output too (its width checked now, so a
    model without a feature layer stops before OUTPUT is touched)."""
    width = _KNOWN_WIDTHS.get(spec.loader)
    if width is None:
        try:
            width = int(feature_tensor(spec.load_keras(), spec.name).shape[-1])
        except NoFeatureLayer as e:
            raise NoFeatureLayer(f"--embeddings: {e}") from None
    return dataclasses.replace(spec, embedding_width=width)


def two_outputs(model, name: str):
    """{probabilities, embedding} from one forward pass (the embedding as float32 features,
    not yet normalized)."""
    import keras

    features = keras.layers.Activation("linear", dtype="float32", name="embedding_float32")(
        feature_tensor(model, name))
    return keras.Model(model.inputs, {PROBABILITIES: model.output, EMBEDDING: features},
                       name=f"{model.name}_with_embedding")
