"""In-process engine: the tf.data reader decodes on its own threads while this thread runs the
model (the caller's BackgroundWriter builds and writes the rows on a third)."""
from __future__ import annotations

from typing import Generator, Iterable

import numpy as np

from .. import runtime
from ..reader import ImageReader
from ..types import ImageRef
from . import EngineJob, ResultBatch


def results(pending: Iterable[ImageRef], job: EngineJob) -> Generator[ResultBatch, None, None]:
    """One ResultBatch per reader batch, in order."""
    predictor = runtime.load(job.spec, job.device)
    reader = ImageReader(pending, job.spec.preprocess, predictor.batch_size, job.limits, job.s3,
                         predictor.feed)
    width = job.spec.embedding_width
    for batch in reader:
        embeddings = None if width is None else np.zeros((0, width), np.float32)
        if batch.refs and width is not None:
            probs, features = predictor.predict_with_features(batch.images)
            embeddings = runtime.l2_normalized(features)
        elif batch.refs:
            probs = predictor.predict(batch.images)
        else:
            probs = np.zeros((0, len(job.spec.labels)), np.float32)
        top_idx, top_scores = runtime.top_k(probs, job.top_k)
        yield ResultBatch(batch.refs, batch.widths, batch.heights, top_idx, top_scores,
                          batch.errors, batch.content_sha256, embeddings)
