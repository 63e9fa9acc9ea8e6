"""Engines turn pending ImageRefs into result batches; `run.label` owns everything stateful
(lock, done set, part writer and its thread, counting, progress, manifest).

Every engine is one module with one function of the same signature:

    results(pending: Iterable[ImageRef], job: EngineJob) -> Generator[ResultBatch, None, None]

    local  in-process: tf.data reader -> predictor
    ray    Ray Data: decode tasks -> an actor pool holding the model (optional extra)

Closing the iterator early (an exception, an interrupt) releases what the engine holds.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterable, Sequence

import numpy as np

from ..devices import Plan
from ..types import ErrorRecord, ImageRef, ModelSpec, ReadLimits, S3Options

NAMES = ("local", "ray")


@dataclass(frozen=True)
class EngineJob:
    """Everything an engine needs, and nothing stateful (a Ray actor receives it pickled)."""

    spec: ModelSpec
    plan: Plan  # devices.plan, made once by run.label on the host that starts the run
    limits: ReadLimits
    s3: S3Options
    top_k: int
    cluster: str | None = None  # --engine ray: a cluster to join; None starts a local one


@dataclass
class ResultBatch:
    """Labeled images (top-k per row, best first) and the ones that failed."""

    refs: list[ImageRef]
    widths: np.ndarray  # original width/height (before EXIF rotation)
    heights: np.ndarray
    top_idx: np.ndarray  # [len(refs), k] indices into the model's labels
    top_scores: np.ndarray  # [len(refs), k]
    errors: list[ErrorRecord] = field(default_factory=list)
    content_sha256: Sequence[str | None] | None = None  # per ref: sha256 of the bytes decoded
    embeddings: np.ndarray | None = None  # [len(refs), width] L2-normalized (--embeddings)


Engine = Callable[[Iterable[ImageRef], EngineJob], Generator[ResultBatch, None, None]]


def get(name: str) -> Engine:
    """The engine called `name` (imported on demand: Ray is an optional extra)."""
    if name not in NAMES:
        raise ValueError(f"unknown engine {name!r}; one of {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}").results
