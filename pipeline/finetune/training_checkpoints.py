"""What --resume continues from: BUNDLE/checkpoints holds state.json (a TrainingState, the
commit point) and the .npz files it names (cached features, weights after an epoch).

Not to be confused with `pipeline.checkpoint`, a labeling OUTPUT's done set and lock."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import atomic
from ..exitcodes import ConfigError
from ..models import bundle

STATE_VERSION = 1
PHASES = ("head", "finetune", "done")


@dataclass
class TrainingState:
    """Where a run is: written after every epoch, read by --resume."""

    params: dict  # FinetuneConfig.result_params() of the run that started
    fingerprint: str  # data_fingerprint of its DATA
    files: dict[str, str]  # role (features, split, last, best, head_final...) -> file name
    phase: str = "head"  # head, then finetune (with --unfreeze-top), then done
    epoch: int = 0  # completed epochs of this phase
    best_epoch: int = 0
    best_val_loss: float | None = None
    wait: int = 0  # epochs since the best validation loss
    best_epochs: dict[str, int] = field(default_factory=dict)  # finished phase -> its best epoch
    history: list[dict] = field(default_factory=list)  # one record per epoch, every phase
    sessions: int = 1  # 1 + the times it was resumed
    version: int = STATE_VERSION

    @classmethod
    def from_json(cls, data, where: str) -> "TrainingState":
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            found = data.get("version") if isinstance(data, dict) else None
            raise ConfigError(f"{where}: checkpoint format {found} is not {STATE_VERSION}; "
                              f"start a new bundle")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names or data["phase"] not in PHASES:
            raise ConfigError(f"{where}: the checkpoint state is damaged (keys "
                              f"{', '.join(sorted(data))}); start a new bundle")
        return cls(**data)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def improves(self, val_loss: float) -> bool:
        return self.best_val_loss is None or val_loss < self.best_val_loss

    def record_epoch(self, record: dict, files: dict[str, str], improved: bool) -> None:
        """Count a finished epoch of this phase (early stopping's wait included)."""
        self.epoch = record["epoch"]
        self.files = files
        self.history = self.history + [record]
        if improved:
            self.best_epoch, self.best_val_loss, self.wait = self.epoch, record["val_loss"], 0
        else:
            self.wait += 1

    def finish_phase(self, final_role: str, final_file: str, following: str) -> None:
        self.files = {k: v for k, v in self.files.items() if k not in ("last", "best")}
        self.files[final_role] = final_file
        self.best_epochs = {**self.best_epochs, self.phase: self.best_epoch}
        self.phase, self.epoch, self.best_epoch, self.best_val_loss, self.wait = following, 0, 0, None, 0

    def epochs_run(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.history:
            counts[record["phase"]] = max(counts.get(record["phase"], 0), record["epoch"])
        return counts


class EpochCheckpoints:
    """BUNDLE/checkpoints: state.json (the commit point) and the .npz files it names."""

    def __init__(self, bundle_dir: str):
        self.dir = os.path.join(bundle_dir, bundle.CHECKPOINT_DIR)
        self.state_path = os.path.join(self.dir, bundle.STATE_FILE)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def read_state(self) -> TrainingState | None:
        if not os.path.isfile(self.state_path):
            return None
        return TrainingState.from_json(bundle.read_json(self.state_path), self.state_path)

    def commit(self, state: TrainingState) -> None:
        """Make `state` the one to resume from, then delete the files it no longer names."""
        bundle.write_json(self.state_path, state.to_json())
        keep = {bundle.STATE_FILE, *state.files.values()}
        for name in os.listdir(self.dir):
            if name not in keep:
                os.unlink(self.path(name))

    def save_arrays(self, name: str, **arrays: Any) -> str:  # Any: mypy would pass an array as savez(allow_pickle=)
        atomic.write_file(self.path(name), lambda f: np.savez(f, **arrays))
        return name

    def save_variables(self, name: str, model, optimizer=None) -> str:
        arrays = {f"v{i}": np.asarray(v) for i, v in enumerate(model.variables)}
        if optimizer is not None:
            arrays.update({f"o{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
        return self.save_arrays(name, **arrays)

    def load_variables(self, name: str, model, optimizer=None) -> None:
        with np.load(self.path(name)) as saved:
            _assign(model.variables, saved, "v")
            if optimizer is not None:
                optimizer.build(model.trainable_variables)
                _assign(optimizer.variables, saved, "o")


def _assign(variables, saved, prefix: str) -> None:
    count = sum(1 for k in saved.files if k.startswith(prefix))
    if count != len(variables):
        raise ConfigError(f"checkpoint holds {count} {prefix}-variables, the model has "
                          f"{len(variables)}; it belongs to a different run")
    for i, v in enumerate(variables):
        v.assign(saved[f"{prefix}{i}"])
