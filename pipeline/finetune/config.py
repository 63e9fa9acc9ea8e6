"""The options of `pipeline finetune`, checked before anything runs."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check_types
from ..exitcodes import ConfigError
from ..types import ModelRequest, ReadLimits, default_cache_dir

# Options that shape the result: --resume must be given the same ones as the interrupted run.
RESULT_PARAMS = ("base", "epochs", "val_split", "unfreeze_top", "batch_size", "learning_rate",
                 "seed", "patience", "augment_copies", "dropout", "max_pixels", "max_file_bytes")


class TrainingDataError(ConfigError):
    """DATA cannot train a classifier (too few classes, an empty class, a bad manifest)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of `pipeline finetune` (kept apart from the labeling RunConfig)."""

    data: str = ""
    bundle: str = ""
    base: str = "efficientnet_lite0"
    epochs: int = 30  # at most, per phase
    val_split: float = 0.2
    unfreeze_top: int = 0
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    patience: int = 5  # epochs without a better validation loss before stopping
    augment_copies: int = 3  # fixed augmented views per training image for head training
    dropout: float = 0.2
    max_pixels: int = ReadLimits.max_pixels
    max_file_bytes: int = ReadLimits.max_file_bytes
    cache_dir: str = field(default_factory=default_cache_dir)
    resume: bool = False

    def __post_init__(self) -> None:
        check_types(self)  # each key by its declared type first, as RunConfig does
        for name in ("epochs", "batch_size", "patience", "max_pixels", "max_file_bytes"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("unfreeze_top", "augment_copies", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        if not 0.0 < self.val_split < 1.0:
            raise ConfigError(f"val_split must be between 0 and 1 (exclusive), got {self.val_split}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def result_params(self) -> dict:
        return {name: getattr(self, name) for name in RESULT_PARAMS}

    def read_limits(self) -> ReadLimits:
        return ReadLimits(self.max_pixels, self.max_file_bytes)

    def model_request(self) -> ModelRequest:
        return ModelRequest(self.base, cache_dir=self.cache_dir)


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
