"""In-process engine: tf.data reader -> predictor -> PartWriter."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Iterable

from ..config import RunConfig
from ..interrupts import deferred
from ..models.registry import ModelSpec
from ..progress import Progress
from ..reader import ImageReader
from ..runtime import Predictor, top_k
from ..sources import ImageRef
from ..writer import PartWriter, RunStamp, error_table, prediction_table


@dataclass
class EngineResult:
    labeled: int = 0
    errors_by_kind: collections.Counter = field(default_factory=collections.Counter)

    @property
    def errors(self) -> int:
        return sum(self.errors_by_kind.values())


def run(pending: Iterable[ImageRef], spec: ModelSpec, predictor: Predictor, writer: PartWriter,
        stamp: RunStamp, cfg: RunConfig, progress: Progress, result: EngineResult) -> None:
    """Label every pending ref into committed parts, counting into `result`. On an exception
    (an interrupt included) the rows already finished are committed before it propagates."""
    reader = ImageReader(pending, spec.preprocess, cfg.batch_size, cfg.max_pixels,
                         cfg.max_file_bytes)
    try:
        for batch in reader:
            if batch.refs:
                idx, scores = top_k(predictor.predict(batch.images), cfg.top_k)
            with deferred():  # a signal lands before or after a batch is added and counted
                if batch.refs:
                    writer.add(prediction_table(batch.refs, batch.widths, batch.heights, idx, scores, stamp))
                if batch.errors:
                    writer.add(error_table(batch.errors, stamp))
                result.labeled += len(batch.refs)
                result.errors_by_kind.update(e.kind for e in batch.errors)
            progress.update(len(batch.refs), len(batch.errors))
    finally:
        writer.commit()
