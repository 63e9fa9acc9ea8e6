"""Fine-tune a pretrained network on your own classes into a bundle `pipeline label` can use.

DATA (one folder per class, or a path/label manifest) goes through the labeling reader's own
preprocessing into the frozen base network once: the plain view of every image plus a few fixed
augmented views (random flip, small random crop) of each training image become pooled feature
vectors. A new head (dropout + softmax Dense) trains on them with class weights and early
stopping on a stratified validation split. With --unfreeze-top K, the top K layer groups of
the base then train on freshly augmented images at learning_rate / 10, BatchNorm kept in
inference mode. The finished model is evaluated through the labeling reader on the validation
images, and the bundle is written (see models/bundle.py). Every epoch is checkpointed in
BUNDLE/checkpoints; --resume continues after the last completed epoch.

Modules, in the order a run uses them: config (FinetuneConfig), data (DATA -> labeled
ImageRefs, split, class weights), views (what the network sees: the labeling view and
augmented views), network (base features, head, full model, unfreezing),
training_checkpoints (TrainingState and BUNDLE/checkpoints, what --resume continues from),
train (the run), evaluate (scores through the labeling reader, the bundle).
"""
from .config import FinetuneConfig, TrainingDataError

_FROM_TRAIN = ("FinetuneSummary", "TrainingFailed", "finetune")


def __getattr__(name: str):
    """The training side on first use, so that the CLI (which reads FinetuneConfig's options
    for --help) does not load it."""
    if name in _FROM_TRAIN:
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FinetuneConfig", "FinetuneSummary", "TrainingDataError", "TrainingFailed", "finetune"]
