"""In-process engine: the tf.data reader decodes on its own threads while this thread runs the
model (the caller's BackgroundWriter builds and writes the rows on a third)."""
from __future__ import annotations

from typing import Generator, Iterable

from .. import runtime
from ..reader import ImageReader
from ..types import ImageRef
from . import EngineJob, ResultBatch


def results(pending: Iterable[ImageRef], job: EngineJob) -> Generator[ResultBatch, None, None]:
    """One ResultBatch per reader batch, in order."""
    predictor = runtime.load(job.spec, job.plan)
    reader = ImageReader(pending, job.spec.preprocess, predictor.batch_size, job.limits, job.s3,
                         predictor.feed)
    for batch in reader:
        scores = runtime.score(predictor, batch.images, job.spec, job.top_k)
        yield ResultBatch(batch.refs, batch.widths, batch.heights, scores.top_idx,
                          scores.top_scores, batch.errors, batch.content_sha256, scores.embeddings)
