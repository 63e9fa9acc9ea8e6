"""Model registry: name -> ModelSpec (builder, input size, preprocessing, labels, weights)."""
from __future__ import annotations

from .registry import ModelSpec, Preprocess, available, get, list_entries

__all__ = ["ModelSpec", "Preprocess", "available", "get", "list_entries"]
