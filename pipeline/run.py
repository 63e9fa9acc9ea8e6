"""One labeling run: lock, done set, engine, part writer, counting, progress, run manifest,
summary and exit code. `label` is the whole job; the engine only computes."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import itertools
import json
import logging
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Generator, Iterable, Iterator

import numpy as np

from . import __version__, devices, engines, exitcodes, interrupts, logs, models, store
from .config import RunConfig
from .doneset import DoneSet, Identity, done_set
from .engines import EngineJob, ResultBatch
from .exitcodes import ConfigError
from .interrupts import Interrupted
from .models.features import with_embeddings
from .progress import Progress
from .sources import RefChunk, SourceStats, iter_chunks
from .store import Store, layout
from .store.replace import Replacement, recover, start_overwrite, unfinished_overwrite
from .types import DeviceRequest, ErrorRecord, ImageRef, Labels, ModelSpec, ReadLimits
from .writer import (BackgroundWriter, OutputError, PartWriter, RunStamp, error_table, new_run_id,
                     prediction_table)

log = logging.getLogger(__name__)

INTERRUPTED_MESSAGE = "interrupted, run the same command again to resume"


@dataclass
class RunSummary:
    run_id: str
    output: str
    model: str
    listed: int = 0
    skipped: int = 0
    labeled: int = 0
    errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)  # new errors only
    still_failing: int = 0  # failed the same way last run, file unchanged: retried, not rewritten
    ignored_files: int = 0
    duplicates: int = 0
    parts_written: int = 0
    parts_replaced: int = 0  # removed by a completed --overwrite
    wall_seconds: float = 0.0
    images_per_second: float = 0.0
    exit_code: int = exitcodes.OK
    message: str = ""

    def line(self) -> str:
        extra = "".join(f", {name}: {n}" for name, n in (
            ("still failing", self.still_failing), ("duplicates", self.duplicates)) if n)
        return (f"labeled {self.labeled}, errors {self.errors}{extra}, skipped {self.skipped} "
                f"(already done), {self.images_per_second:.1f} images/s, "
                f"wall {self.wall_seconds:.1f}s -> {self.output}")


def label(cfg: RunConfig) -> RunSummary:
    """Label cfg.input into cfg.output; see RunSummary.exit_code for the outcome."""
    started = time.monotonic()
    interrupts.reset()
    s3 = cfg.s3_options()
    spec = models.get(cfg.model_request())
    if cfg.embeddings:
        spec = with_embeddings(spec)
    cfg = _effective_top_k(cfg, spec)
    device = _resolved_device(cfg)
    if spec.embedding_width is not None and device.precision == "int8":
        raise ConfigError("--embeddings is not available with --precision int8 yet (the "
                          "calibrated flatbuffer has one output); use float32")
    stats = SourceStats()
    summary = RunSummary(cfg.run_id or new_run_id(), cfg.output, spec.name)
    try:
        listing = _nonempty(iter_chunks(cfg.input, stats, cfg.inventory_prefix, s3,
                                        stop=interrupts.requested), cfg)
    except (Interrupted, KeyboardInterrupt):  # a slow listing: nothing started, OUTPUT untouched
        summary.exit_code, summary.message = exitcodes.INTERRUPTED, INTERRUPTED_MESSAGE
        return summary
    out = store.open_output(cfg.output, s3)
    out.prepare()
    engine = engines.get(cfg.engine)
    job = EngineJob(spec, device, cfg.read_limits(), s3, cfg.top_k, cfg.ray_address)
    progress = Progress(cfg.progress if not cfg.json else "none", cfg.log_interval)
    timings: dict[str, float] = {}  # seconds since the start, for the run manifest
    with interrupts.raised_on_signals(), \
            out.lock(lease=cfg.s3_lock_lease):
        for note in recover(out):  # temp files, an interrupted compaction
            log.info(note)
        overwrite = _overwrite(cfg, out, spec.name, summary.run_id)
        replaced = frozenset(overwrite.remove if overwrite else ())
        identity = _identity(spec, device, job.limits, cfg.embeddings)
        done = done_set(out, identity, ignore=replaced)
        timings["done_set_seconds"] = round(time.monotonic() - started, 3)
        failed_before: dict[str, str] = {}  # image_id -> error_kind of a failure that may repeat
        pending = _first_noted(_skip_done(listing, done, summary, failed_before), timings,
                               started)
        writer = PartWriter(out, summary.run_id, cfg.part_size,
                            _file_metadata(spec, cfg.top_k, identity), spec.embedding_width)
        record = _Once(lambda: _record(cfg, out, spec, summary, started, writer, stats, progress,
                                       timings))
        with interrupts.rescue_with(lambda: _record_interrupted(record, summary, cfg.json)):
            try:
                _write_results(engine(pending, job), writer, RunStamp(spec.name, summary.run_id),
                               spec.labels, failed_before, summary, progress)
                if interrupts.requested():  # the listing stopped early: not every input was seen
                    raise Interrupted("signal")
                if overwrite:
                    _complete_overwrite(overwrite, summary)
                out.fence()  # a run whose lease was taken over does not end as a success
            except (Interrupted, KeyboardInterrupt):
                summary.exit_code, summary.message = exitcodes.INTERRUPTED, INTERRUPTED_MESSAGE
            except Exception as e:  # the manifest records the real exit code, the log the traceback
                if not interrupts.disguised(e):
                    _record_failure(e, out, summary)
                    raise
                summary.exit_code, summary.message = exitcodes.INTERRUPTED, INTERRUPTED_MESSAGE
            finally:
                record()
    return summary


def _effective_top_k(cfg: RunConfig, spec: ModelSpec) -> RunConfig:
    """--top-k above the model's class count keeps every class, and says so; the parts'
    metadata and the run manifest record the k actually kept."""
    classes = len(spec.labels.ids)
    if cfg.top_k <= classes:
        return cfg
    log.warning(f"--top-k {cfg.top_k} is more than the {classes} classes of {spec.name}: "
                f"keeping all {classes}")
    return cfg.replace(top_k=classes)


class _Once:
    """Call a function once, from whichever thread comes first; a later caller waits for it."""

    def __init__(self, fn):
        self._fn, self._lock, self._done = fn, threading.Lock(), False

    def __call__(self) -> None:
        with self._lock:
            if not self._done:
                self._done = True
                self._fn()


def _record(cfg: RunConfig, out: Store, spec: ModelSpec, summary: RunSummary, started: float,
            writer: PartWriter, stats: SourceStats, progress: Progress,
            timings: dict[str, float]) -> None:
    """The end of every run: counts, exit code, run manifest."""
    progress.close()
    _finish(summary, started, writer, stats)
    if summary.exit_code == exitcodes.OK:
        summary.exit_code, summary.message = _judge_errors(summary, cfg)
    _write_manifest(cfg, out, spec, summary, timings)


def _record_interrupted(record: _Once, summary: RunSummary, as_json: bool) -> None:
    """The signal watchdog's way out (the main thread is stuck in native code): the manifest
    and the summary as the CLI would print them; the rows were committed by the writer's own
    rescue, which runs first."""
    summary.exit_code, summary.message = exitcodes.INTERRUPTED, INTERRUPTED_MESSAGE
    record()
    if as_json:
        print(json.dumps(dataclasses.asdict(summary)), flush=True)
    else:
        print(summary.line(), file=sys.stderr, flush=True)


def _write_results(batches: Generator[ResultBatch, None, None], writer: PartWriter, stamp: RunStamp,
                   labels: Labels, failed_before: dict[str, str], summary: RunSummary,
                   progress: Progress) -> None:
    """Every result batch -> rows on the background writer, counted into `summary`. On an
    exception (an interrupt included) the rows already received are committed before it
    propagates, and the engine is closed (a Ray cluster it started is shut down).

    The engine computes while the writer's thread builds and writes the rows: the slowest of
    reading, the model and writing sets the pace."""
    rows = BackgroundWriter(writer)
    try:
        # a signal while stuck in native code (tf.data, Ray): the watchdog commits what is queued
        with interrupts.rescue_with(rows.close), contextlib.closing(batches):
            for batch in batches:
                with interrupts.deferred():  # a signal lands before or after a batch is counted
                    errors = _new_errors(batch.errors, failed_before, summary)
                    _submit(rows, batch, errors, stamp, labels)
                    summary.labeled += len(batch.refs)
                progress.update(len(batch.refs), len(batch.errors))
    finally:
        rows.close()


def _new_errors(errors: list[ErrorRecord], failed_before: dict[str, str],
                summary: RunSummary) -> list[ErrorRecord]:
    """Count `errors` and return those to write: a failure identical to the latest row (same
    kind, file unchanged) is counted as still failing and not written again."""
    new = [e for e in errors if failed_before.get(e.ref.image_id) != e.kind]
    summary.still_failing += len(errors) - len(new)
    for e in new:
        summary.errors_by_kind[e.kind] = summary.errors_by_kind.get(e.kind, 0) + 1
    return new


def _submit(rows: BackgroundWriter, batch: ResultBatch, errors: list[ErrorRecord],
            stamp: RunStamp, labels: Labels) -> None:
    if batch.refs:
        rows.submit(functools.partial(prediction_table, batch.refs, batch.widths, batch.heights,
                                      batch.top_idx, batch.top_scores, stamp, labels,
                                      batch.content_sha256, batch.embeddings))
    if errors:
        rows.submit(functools.partial(error_table, errors, stamp))


def _nonempty(chunks: Iterator[RefChunk], cfg: RunConfig) -> Iterator[RefChunk]:
    """`chunks` unchanged; ConfigError (exit 2) if there is no ref, unless cfg.allow_empty: an
    empty or unmounted folder, or an empty manifest, must not look like a quiet night."""
    first = next(chunks, None)
    if first is None:
        if cfg.allow_empty:
            return iter(())
        raise ConfigError(f"no images in INPUT {cfg.input} (an empty or unmounted folder, or an "
                          "empty manifest?); pass --allow-empty (allow_empty = true) if this "
                          "feed may legitimately be empty")
    return itertools.chain([first], chunks)


def _overwrite(cfg: RunConfig, out: Store, model: str, run_id: str) -> Replacement | None:
    """The --overwrite this run is part of: an unfinished one for `model`, or a new one."""
    rep = unfinished_overwrite(out, model)
    if rep is not None:
        log.info(f"continuing the unfinished --overwrite run {rep.id}: its {len(rep.remove)} "
                     "earlier part(s) are replaced when this run completes")
    elif cfg.overwrite:
        rep = start_overwrite(out, model, run_id)
    return rep


def _complete_overwrite(overwrite: Replacement, summary: RunSummary) -> None:
    with interrupts.deferred():
        overwrite.commit()
    summary.parts_replaced = len(overwrite.remove)


def _resolved_device(cfg: RunConfig) -> DeviceRequest:
    """The device request with `auto` decided on this host, so the rows' identity names what
    really computed the scores; Ray actors get the same decision instead of making their own."""
    request = cfg.device_request()
    plan = devices.plan(request, devices.local_gpus())
    return dataclasses.replace(request, runtime=plan.runtime, precision=plan.precision,
                               feed=plan.feed)


def _identity(spec: ModelSpec, device: DeviceRequest, limits: ReadLimits,
              embeddings: bool) -> Identity:
    """Everything that changes the scores: the model's weights and preprocessing, the runtime,
    the precision and the feed (uint8 pixels are rounded), as resolved for this run, and full
    or reduced-scale JPEG decode; and whether rows must have embeddings."""
    return Identity(spec.name, spec.weights_sha256, spec.preprocess.describe(),
                               device.runtime, devices.RECORDED_PRECISION[device.precision],
                               device.feed, "scaled" if limits.scaled_decode else "full",
                               embeddings)


def _first_noted(refs: Iterator[ImageRef], timings: dict[str, float],
                 started: float) -> Iterator[ImageRef]:
    """`refs`, noting when the first one went to the reader (`first_pending_seconds`)."""
    for ref in refs:
        timings.setdefault("first_pending_seconds", round(time.monotonic() - started, 3))
        yield ref


def _skip_done(chunks: Iterable[RefChunk], done: DoneSet, summary: RunSummary,
               failed_before: dict[str, str]) -> Iterator[ImageRef]:
    """The refs that are not done (a whole chunk is checked at once; refs are made only for the
    pending rows); a ref that failed the same way last time is still retried, and
    `failed_before` remembers its error kind (an identical failure is not written again)."""
    for chunk in chunks:
        if interrupts.requested():  # in a tf.data thread: end the stream, main thread raises
            return
        is_done, previous_error = done.check_columns(chunk.ids, chunk.size, chunk.mtime_ns)
        summary.skipped += int(is_done.sum())
        pending = np.flatnonzero(~is_done)
        for row, ref in zip(pending.tolist(), chunk.refs(pending)):
            if interrupts.requested():
                return
            if row in previous_error:
                failed_before[ref.image_id] = previous_error[row]
            yield ref


def _finish(summary: RunSummary, started: float, writer: PartWriter, stats: SourceStats) -> None:
    summary.errors = sum(summary.errors_by_kind.values())
    summary.parts_written = len(writer.committed_parts)
    summary.listed, summary.ignored_files = stats.listed, stats.ignored
    summary.duplicates = stats.duplicates
    summary.wall_seconds = time.monotonic() - started
    processed = summary.labeled + summary.errors
    summary.images_per_second = processed / summary.wall_seconds if summary.wall_seconds else 0.0


def _judge_errors(summary: RunSummary, cfg: RunConfig) -> tuple[int, str]:
    processed = summary.labeled + summary.errors  # unchanged failures are not new: not counted
    if processed == 0:
        if summary.still_failing:
            return exitcodes.OK, (f"nothing new to label; {summary.still_failing} input(s) failed "
                                  "again as in the last run (not written again)")
        if summary.skipped:
            return exitcodes.OK, "nothing new to label: every input is already in the output"
        return exitcodes.OK, "no images in the input (allowed by --allow-empty)"
    rate = summary.errors / processed
    if rate > cfg.max_error_rate:
        return exitcodes.TOO_MANY_ERRORS, (
            f"{summary.errors} of {processed} images failed ({rate:.1%}), above "
            f"--max-error-rate {cfg.max_error_rate:.1%}")
    return exitcodes.OK, ""


def _file_metadata(spec: ModelSpec, top_k: int, identity: Identity) -> dict[str, str]:
    return {
        **identity.metadata(),  # model, weights_sha256, preprocessing, runtime, precision, feed
        "pipeline.weights_source": spec.weights_source,
        "pipeline.top_k": str(top_k),
        "pipeline.version": __version__,
    }


def _record_failure(exc: Exception, out: Store, summary: RunSummary) -> None:
    outcome = exitcodes.outcome(exc, INTERRUPTED_MESSAGE)
    summary.exit_code, summary.message = outcome.code, outcome.message
    if outcome.unexpected:
        exc.traceback_log = _write_traceback(out, summary.run_id, exc)  # type: ignore[attr-defined]  # cli reads it


def _write_traceback(out: Store, run_id: str, exc: Exception) -> str | None:
    """OUTPUT/_runs/<run_id>.log with the traceback; None if even that cannot be written."""
    uri = out.uri(layout.run_log(run_id))
    text = logs.format_traceback(exc).encode("utf-8")
    try:
        out.write_bytes(layout.run_log(run_id), text, fenced=False)
    except OSError as e:
        log.warning(f"traceback not written to {uri}: {e}")
        return None
    return uri


def _versions() -> dict[str, str]:
    import numpy
    import pyarrow
    import tensorflow as tf

    return {"pipeline": __version__, "python": platform.python_version(),
            "tensorflow": tf.__version__, "numpy": numpy.__version__, "pyarrow": pyarrow.__version__}


def _write_manifest(cfg: RunConfig, out: Store, spec: ModelSpec, summary: RunSummary,
                    timings: dict[str, float]) -> None:
    manifest = {
        "run_id": summary.run_id,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "model": {"name": spec.name, "weights_sha256": spec.weights_sha256,
                  "weights_source": spec.weights_source, "preprocessing": spec.preprocess.describe()},
        "summary": dataclasses.asdict(summary),
        "timings": timings,
        "host": platform.node(),
        "versions": _versions(),
    }
    try:
        with interrupts.deferred():
            out.write_json(layout.run_manifest(summary.run_id), manifest, fenced=False)
    except OutputError as e:  # the parts are what counts; a full disk must not hide the real error
        log.warning(f"run manifest not written: {e}")
