"""Models: `get(ModelRequest) -> ModelSpec` and the registry listing.

    base        registry entries, normalizations and crops, weight checksums (shared by all below)
    lite        the embedded EfficientNet-Lite0/1/2 and their converted-weights cache
    keras_apps  keras.applications networks with weights from Keras' cache or --weights
    custom      a .keras file or SavedModel directory (--model PATH)
    bundle      a directory `pipeline finetune` wrote
    features    --embeddings: the pooled features as a second model output
    registry    lookup over all of them
"""
from __future__ import annotations

from ..types import ModelRequest, ModelSpec, Preprocess
from .registry import available, get, list_entries

__all__ = ["ModelRequest", "ModelSpec", "Preprocess", "available", "get", "list_entries"]
