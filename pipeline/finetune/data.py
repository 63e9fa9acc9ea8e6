"""Training data: DATA (class folders or a path/label manifest) as labeled ImageRefs, the
stratified split and the class weights."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import sources
from ..types import ImageRef
from .config import TrainingDataError

MANIFEST_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class Example:
    ref: ImageRef  # image_id: path relative to DATA (folders), or as the manifest wrote it
    label: int

    @property
    def image_id(self) -> str:
        return self.ref.image_id

    @property
    def path(self) -> str:
        """Absolute path or s3:// URI."""
        return self.ref.uri


def read_examples(data: str) -> tuple[list[str], list[Example]]:
    """Class names (sorted) and the labeled images of DATA; TrainingDataError if unusable."""
    p = Path(data)
    if p.is_dir():
        classes, examples = _folder_examples(p)
    elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
        classes, examples = _manifest_examples(p)
    elif not p.exists():
        raise TrainingDataError(f"training data not found: {data}")
    else:
        raise TrainingDataError(f"{data}: DATA must be a folder with one subfolder per class, or a "
                                f".csv/.parquet manifest with 'path' and 'label' columns")
    if len(classes) < 2:
        found = ", ".join(repr(c) for c in classes) or "none"
        raise TrainingDataError(f"need at least 2 classes to train a classifier; {data} has {found}")
    return classes, examples


def _folder_examples(root: Path) -> tuple[list[str], list[Example]]:
    with os.scandir(root) as it:
        classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    examples = []
    for label, name in enumerate(classes):
        refs = list(sources.iter_refs(str(root / name)))
        if not refs:
            raise TrainingDataError(f"class {name!r} is empty: {root / name} has no images")
        examples += [Example(dataclasses.replace(r, image_id=f"{name}/{r.image_id}"), label)
                     for r in refs]
    return classes, examples


def _manifest_examples(path: Path) -> tuple[list[str], list[Example]]:
    """A file listed twice counts once; under two labels, or two files under one id, is an error."""
    rows = []
    for ref, label in sources.read_manifest(path, extra_column="label"):
        if ref.entry_error:
            raise TrainingDataError(ref.entry_error)
        if label is None:
            raise TrainingDataError(f"manifest {path} lists {ref.image_id} without a label")
        rows.append((ref, label))
    classes = sorted({label for _, label in rows})
    index = {c: i for i, c in enumerate(classes)}
    by_uri: dict[str, Example] = {}
    uri_of_id: dict[str, str] = {}
    for ref, label in rows:
        seen = by_uri.get(ref.uri)
        if seen is not None and seen.label != index[label]:
            raise TrainingDataError(f"manifest {path} lists {ref.image_id} under two labels: "
                                    f"{classes[seen.label]!r} and {label!r}")
        if uri_of_id.setdefault(ref.image_id, ref.uri) != ref.uri:
            raise TrainingDataError(f"manifest {path} gives the id {ref.image_id!r} to two files: "
                                    f"{uri_of_id[ref.image_id]} and {ref.uri}")
        by_uri.setdefault(ref.uri, Example(ref, index[label]))
    return classes, list(by_uri.values())


def data_fingerprint(classes: list[str], examples: list[Example]) -> str:
    """Changes when a class, a file, its label, size or mtime changes."""
    h = hashlib.sha256(json.dumps(classes).encode())
    for ex in examples:
        h.update(json.dumps([ex.path, ex.label, [ex.ref.file_size, ex.ref.mtime_ns]]).encode())
    return h.hexdigest()


def stratified_split(labels: np.ndarray, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): round(val_split x n) of each class (at least 1, never all) to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(max(1, round(len(idx) * val_split)), len(idx) - 1)
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """n / (k x n_c): every class weighs the same in the loss, whatever its size."""
    counts = np.bincount(labels, minlength=n_classes)
    return {c: float(len(labels) / (n_classes * counts[c])) for c in range(n_classes) if counts[c]}


def check_class_sizes(classes: list[str], labels: np.ndarray, skipped: list[dict]) -> None:
    """Every class needs 2 readable images: one to train on, one to validate with."""
    counts = np.bincount(labels, minlength=len(classes)) if len(labels) else np.zeros(len(classes), int)
    for c, name in enumerate(classes):
        if counts[c] < 2:
            bad = sum(1 for s in skipped if s["label"] == name)
            raise TrainingDataError(
                f"class {name!r} has {counts[c]} readable image(s) ({bad} unreadable); it needs at "
                f"least 2 (one to train on, one to validate with)")
