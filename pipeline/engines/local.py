"""In-process engine: the tf.data reader decodes on its own threads while this thread runs the
model (the caller's BackgroundWriter builds and writes the rows on a third)."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from .. import runtime
from ..reader import ImageReader
from ..types import ImageRef
from . import EngineJob, ResultBatch


def results(pending: Iterable[ImageRef], job: EngineJob) -> Iterator[ResultBatch]:
    """One ResultBatch per reader batch, in order."""
    predictor = runtime.load(job.spec, job.device)
    reader = ImageReader(pending, job.spec.preprocess, predictor.batch_size, job.limits, job.s3,
                         predictor.feed)
    for batch in reader:
        if batch.refs:
            top_idx, top_scores = runtime.top_k(predictor.predict(batch.images), job.top_k)
        else:
            top_idx = np.zeros((0, job.top_k), np.int64)
            top_scores = np.zeros((0, job.top_k), np.float32)
        yield ResultBatch(batch.refs, batch.widths, batch.heights, top_idx, top_scores,
                          batch.errors)
