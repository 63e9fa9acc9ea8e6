"""In-process engine: tf.data reader -> predictor -> PartWriter (on a background thread)."""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from ..config import RunConfig
from ..interrupts import deferred, rescue_with
from ..progress import Progress
from ..reader import ErrorRecord, ImageReader
from ..runtime import Predictor, top_k
from ..types import ImageRef, ModelSpec
from ..writer import PartWriter, RunStamp, error_table, prediction_table
from .background import BackgroundWriter


@dataclass
class EngineResult:
    labeled: int = 0
    errors_by_kind: collections.Counter = field(default_factory=collections.Counter)  # new ones
    still_failing: int = 0
    # image_id -> error_kind of its latest row, for refs whose earlier failure may repeat
    failed_before: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(self.errors_by_kind.values())

    def new_errors(self, errors: Sequence[ErrorRecord]) -> list[ErrorRecord]:
        """Count `errors` and return those to write: a failure identical to the latest row
        (same kind, file unchanged) is counted as still failing and not written again."""
        new = [e for e in errors if self.failed_before.get(e.ref.image_id) != e.kind]
        self.still_failing += len(errors) - len(new)
        self.errors_by_kind.update(e.kind for e in new)
        return new


def run(pending: Iterable[ImageRef], spec: ModelSpec, predictor: Predictor, writer: PartWriter,
        stamp: RunStamp, cfg: RunConfig, progress: Progress, result: EngineResult) -> None:
    """Label every pending ref into committed parts, counting into `result`. On an exception
    (an interrupt included) the rows already finished are committed before it propagates.

    tf.data decodes on its own threads while this thread runs the model, and the rows are
    built and written on the writer's thread: the slowest of the three stages sets the pace.
    """
    reader = ImageReader(pending, spec.preprocess, predictor.batch_size, cfg.read_limits())
    rows = BackgroundWriter(writer)
    try:
        with rescue_with(rows.close):  # a signal while stuck in tf.data: commit what is queued
            _label_batches(reader, predictor, rows, stamp, cfg, progress, result)
    finally:
        rows.close()


def _label_batches(reader: ImageReader, predictor: Predictor, rows: BackgroundWriter,
                   stamp: RunStamp, cfg: RunConfig, progress: Progress, result: EngineResult) -> None:
    for batch in reader:
        if batch.refs:
            probs = predictor.predict(batch.images)
        with deferred():  # a signal lands before or after a batch is submitted and counted
            if batch.refs:
                rows.submit(functools.partial(_prediction_rows, batch.refs, batch.widths,
                                              batch.heights, probs, cfg.top_k, stamp))
            errors = result.new_errors(batch.errors)
            if errors:
                rows.submit(functools.partial(error_table, errors, stamp))
            result.labeled += len(batch.refs)
        progress.update(len(batch.refs), len(batch.errors))


def _prediction_rows(refs: Sequence[ImageRef], widths: np.ndarray, heights: np.ndarray,
                     probs: np.ndarray, k: int, stamp: RunStamp) -> pa.Table:
    idx, scores = top_k(probs, k)
    return prediction_table(refs, widths, heights, idx, scores, stamp)
