"""The options of `pipeline finetune`, checked before anything runs."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..exitcodes import ConfigError
from ..options import check_options, int_at_least, narrow, option, within
from ..types import ModelRequest, ReadLimits, default_cache_dir

# Options that shape the result: --resume must be given the same ones as the interrupted run.
RESULT_PARAMS = ("base", "epochs", "val_split", "unfreeze_top", "batch_size", "learning_rate",
                 "seed", "patience", "augment_copies", "dropout", "max_pixels", "max_file_bytes")


class TrainingDataError(ConfigError):
    """DATA cannot train a classifier (too few classes, an empty class, a bad manifest)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of `pipeline finetune` (kept apart from the labeling RunConfig), each declared
    once as in RunConfig (see options.py)."""

    data: str = option("", argument="DATA", help=(
        "Training images: a folder with one subfolder per class, or a .csv/.parquet manifest "
        "with 'path' and 'label' columns (relative paths resolve against the manifest's folder; "
        "s3:// paths are read from S3; an optional 'id' column names the image)."))
    bundle: str = option("", argument="BUNDLE", help=(
        "Bundle directory to write (model.keras, labels.json, preprocess.json, metrics.json, "
        "bundle.json)."))
    base: str = option(ModelRequest.model, feeds=ModelRequest, as_name="model", default_help="",
                       help=("Pretrained base network, a name from `pipeline models`; default "
                             "efficientnet_lite0."))
    epochs: int = option(30, check=int_at_least(1),
                         help="Most epochs per phase (head, then fine-tune).")
    val_split: float = option(
        0.2, check=within(0.0, 1.0, "between 0 and 1 (exclusive)", low_open=True, high_open=True),
        help="Share of each class held out for validation and early stopping.")
    unfreeze_top: int = option(0, check=int_at_least(0), help=(
        "After the head, also train the base's top K layer groups at learning-rate / 10; "
        "BatchNorm stays frozen."))
    batch_size: int = option(32, check=int_at_least(1), help="Images per training batch.")
    learning_rate: float = option(1e-3, check=within(0.0, math.inf, "positive", low_open=True),
                                  help="Adam learning rate of the head.")
    seed: int = option(0, check=int_at_least(0), help=(
        "Split, augmentation and init seed; the same seed gives the same model."))
    patience: int = option(5, check=int_at_least(1), help=(
        "Stop a phase after this many epochs without a better validation loss."))
    augment_copies: int = option(3, check=int_at_least(0), help=(
        "Fixed augmented views (flip, small crop) per training image."))
    dropout: float = option(0.2, check=within(0.0, 1.0, "in [0, 1)", high_open=True), cli=False)
    max_pixels: int = option(ReadLimits.max_pixels, feeds=ReadLimits, check=int_at_least(1),
                             cli=False)
    max_file_bytes: int = option(ReadLimits.max_file_bytes, feeds=ReadLimits,
                                 check=int_at_least(1), cli=False)
    cache_dir: str = option(default_factory=default_cache_dir, feeds=ModelRequest,
                            default_help="~/.cache/pipeline", help="Converted weights cache.")
    resume: bool = option(False, flags=("--resume",), help=(
        "Continue an interrupted run after its last completed epoch (same DATA and options)."))

    def __post_init__(self) -> None:
        check_options(self)

    def result_params(self) -> dict:
        return {name: getattr(self, name) for name in RESULT_PARAMS}

    def read_limits(self) -> ReadLimits:
        return narrow(self, ReadLimits)

    def model_request(self) -> ModelRequest:
        return narrow(self, ModelRequest)
