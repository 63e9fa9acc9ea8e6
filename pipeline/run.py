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

from . import __version__, devices, doneindex, engines, exitcodes, interrupts, logs, models, store
from .config import RunConfig
from .doneset import DoneSet, Identity
from .engines import EngineJob, ResultBatch
from .exitcodes import INTERRUPTED_MESSAGE, ConfigError
from .interrupts import Interrupted
from .models.features import with_embeddings
from .progress import Progress
from .sources import KnownIds, RefChunk, SourceStats, iter_chunks
from .store import Store, layout
from .store.replace import Replacement, recover, start_overwrite, unfinished_overwrite
from .types import ErrorRecord, ImageRef, Labels, ModelSpec, ReadLimits
from .writer import (BackgroundWriter, OutputError, PartWriter, RunStamp, error_table, new_run_id,
                     prediction_table)

log = logging.getLogger(__name__)

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
    """Label cfg.input into cfg.output; see RunSummary.exit_code for the outcome. The caller
    installs the signal handlers (the CLI does, once, for every command)."""
    started = time.monotonic()
    interrupts.reset()
    spec = models.get(cfg.model_request())
    if cfg.embeddings:
        spec = with_embeddings(spec)
    cfg = _effective_top_k(cfg, spec)
    plan = _device_plan(cfg, spec)
    run = Run(cfg, spec, plan, started)
    out = store.open_output(cfg.output, run.s3)  # a wrong OUTPUT is refused before listing
    known = KnownIds()  # the done set's lookup, once it is built
    try:
        listing = _nonempty(iter_chunks(cfg.input, run.stats, cfg.inventory_prefix, run.s3,
                                        stop=interrupts.requested, known=known), cfg)
    except (Interrupted, KeyboardInterrupt):  # a slow listing: nothing started, OUTPUT untouched
        return run.interrupted()
    out.prepare()
    engine = engines.get(cfg.engine)
    job = EngineJob(spec, plan, cfg.read_limits(), run.s3, cfg.top_k, cfg.ray_address)
    with out.lock(lease=cfg.s3_lock_lease):
        for note in recover(out):  # temp files, a killed compaction
            log.info(note)
        overwrite = _overwrite(cfg, out, spec.name, run.summary.run_id)
        replaced = frozenset(overwrite.remove if overwrite else ())
        done, basis = doneindex.done_set(out, run.identity, ignore=replaced)
        run.note_time("done_set_seconds")
        known.lookup = done.find
        pending = Pending(listing, done)
        writer = PartWriter(out, run.summary.run_id, cfg.part_size, run.file_metadata(),
                            spec.embedding_width)
        # the watchdog's rescue outlives `recorded`: leaving it frees the traceback of an
        # interrupt, and with it the engine's tf.data iterator, which waits for stuck decodes
        with interrupts.rescue_with(run.rescue), run.recorded(out, writer, pending):
            _write_results(engine(pending, job), writer, run)
            if interrupts.requested():  # the listing stopped early: not every input was seen
                raise Interrupted("signal")
            if overwrite:
                _complete_overwrite(overwrite, run.summary)
            out.fence()  # a run whose lease was taken over does not end as a success
        if run.summary.exit_code != exitcodes.INTERRUPTED:  # an interrupt ends within seconds
            _refresh_index(out, run.identity, basis)
    return run.summary


def _refresh_index(out: Store, identity: Identity, basis: doneindex.Basis | None) -> None:
    """Save the done index for the next run. The parts are committed and counted: a save that
    fails or is interrupted (it is crash-safe) costs the next run a merge, not this run's
    outcome."""
    try:
        doneindex.refresh(out, identity, basis)
    except (Interrupted, KeyboardInterrupt):
        log.info("done index not saved: interrupted (the next run merges the new parts)")
    except OSError as e:
        log.warning(f"done index not saved: {e}")


def _device_plan(cfg: RunConfig, spec: ModelSpec) -> devices.Plan:
    """devices.plan on this host, made once: the engine loads the model by it, and the rows'
    identity names what really computed the scores (Ray actors get the same decision)."""
    plan = devices.plan(cfg.device_request(), devices.local_gpus())
    if spec.embedding_width is not None and plan.int8:
        raise ConfigError("--embeddings is not available with --precision int8 yet (the "
                          "calibrated flatbuffer has one output); use float32")
    return plan


def _effective_top_k(cfg: RunConfig, spec: ModelSpec) -> RunConfig:
    """--top-k above the model's class count keeps every class, and says so; the parts'
    metadata and the run manifest record the k actually kept."""
    classes = len(spec.labels.ids)
    if cfg.top_k <= classes:
        return cfg
    log.warning(f"--top-k {cfg.top_k} is more than the {classes} classes of {spec.name}: "
                f"keeping all {classes}")
    return cfg.replace(top_k=classes)


class Pending:
    """The listing's refs that are not done yet, for the engine to pull (the local engine pulls
    them on a tf.data thread). This is the run's one hand-off between threads: what filtering
    learns (how many were skipped, which failed before, when the first ref left) stays here,
    behind a lock, and the run reads it only through the methods below.

    A whole chunk is checked at once and refs are made only for its pending rows; a ref that
    failed last time with the file unchanged is retried, and `failed_before` tells its error
    kind (an identical failure is not written again)."""

    def __init__(self, chunks: Iterable[RefChunk], done: DoneSet):
        self._chunks, self._done = chunks, done
        self._lock = threading.Lock()
        self._skipped = 0
        self._failed_before: dict[str, str] = {}  # image_id -> error kind of the latest row
        self._first_at: float | None = None  # time.monotonic() when the first ref left

    def __iter__(self) -> Iterator[ImageRef]:
        for chunk in self._chunks:
            if interrupts.requested():  # in a tf.data thread: end the stream, main thread raises
                return
            found = chunk.found if chunk.found is not None else self._done.find(chunk.ids)
            is_done, previous_error = self._done.check_found(found, chunk.size, chunk.mtime_ns)
            pending = np.flatnonzero(~is_done)
            with self._lock:
                self._skipped += int(is_done.sum())
            for row, ref in zip(pending.tolist(), chunk.refs(pending)):
                if interrupts.requested():
                    return
                with self._lock:
                    if row in previous_error:
                        self._failed_before[ref.image_id] = previous_error[row]
                    if self._first_at is None:
                        self._first_at = time.monotonic()
                yield ref

    @property
    def skipped(self) -> int:
        with self._lock:
            return self._skipped

    @property
    def first_at(self) -> float | None:
        with self._lock:
            return self._first_at

    def failed_before(self, image_id: str) -> str | None:
        with self._lock:
            return self._failed_before.get(image_id)


class Run:
    """One run's state: the summary and its counts, the timings, the exit code, the progress
    display, and the one record of how the run ended (counts, exit code, run manifest), made
    once whichever comes first: the main thread, or the signal watchdog when it is stuck."""

    def __init__(self, cfg: RunConfig, spec: ModelSpec, plan: devices.Plan, started: float):
        self.cfg, self.spec, self.started = cfg, spec, started
        self.s3 = cfg.s3_options()
        self.identity = _identity(spec, plan, cfg.read_limits(), cfg.embeddings)
        self.summary = RunSummary(cfg.run_id or new_run_id(), cfg.output, spec.name)
        self.stats = SourceStats()  # the listing's counts, kept by iter_chunks as it lists
        self.timings: dict[str, float] = {}  # seconds since the start, for the run manifest
        self.progress = Progress("none")  # the real one starts with the run proper
        self._out: Store | None = None
        self._writer: PartWriter | None = None
        self._pending: Pending | None = None
        self._record_lock = threading.Lock()
        self._recorded = False

    def note_time(self, name: str) -> None:
        self.timings[name] = round(time.monotonic() - self.started, 3)

    def file_metadata(self) -> dict[str, str]:
        return {
            **self.identity.metadata(),  # model, weights_sha256, preprocessing, runtime, ...
            "pipeline.weights_source": self.spec.weights_source,
            "pipeline.top_k": str(self.cfg.top_k),
            "pipeline.version": __version__,
        }

    def interrupted(self) -> RunSummary:
        """The one place a run is marked interrupted (exit 130)."""
        self.summary.exit_code = exitcodes.INTERRUPTED
        self.summary.message = INTERRUPTED_MESSAGE
        return self.summary

    @contextlib.contextmanager
    def recorded(self, out: Store, writer: PartWriter, pending: Pending) -> Iterator[None]:
        """The run proper. However it ends (done, interrupted, failed, or stuck and ended by
        the signal watchdog), the counts, the exit code and the run manifest are recorded."""
        self._out, self._writer, self._pending = out, writer, pending
        self.progress = Progress(self.cfg.progress if not self.cfg.json else "none",
                                 self.cfg.log_interval)
        try:
            yield
        except (Interrupted, KeyboardInterrupt):
            self.interrupted()
        except Exception as e:  # the manifest records the real exit code, the log the traceback
            if not interrupts.disguised(e):
                self._failed(e)
                raise
            self.interrupted()
        finally:
            self._record()

    def count(self, batch: ResultBatch) -> list[ErrorRecord]:
        """Count a result batch; return the errors to write: a failure identical to the latest
        row (same kind, file unchanged) is counted as still failing and not written again."""
        assert self._pending is not None
        new = [e for e in batch.errors if self._pending.failed_before(e.ref.image_id) != e.kind]
        self.summary.still_failing += len(batch.errors) - len(new)
        for e in new:
            self.summary.errors_by_kind[e.kind] = self.summary.errors_by_kind.get(e.kind, 0) + 1
        self.summary.labeled += len(batch.refs)
        return new

    def _failed(self, exc: Exception) -> None:
        outcome = exitcodes.outcome(exc, INTERRUPTED_MESSAGE)
        self.summary.exit_code, self.summary.message = outcome.code, outcome.message
        if outcome.unexpected:
            assert self._out is not None
            log_uri = _write_traceback(self._out, self.summary.run_id, exc)
            exc.traceback_log = log_uri  # type: ignore[attr-defined]  # the CLI names it

    def _record(self) -> None:
        """The end of every run, once (from whichever thread comes first; a later caller waits):
        counts, exit code, run manifest."""
        with self._record_lock:
            if self._recorded:
                return
            self._recorded = True
            self.progress.close()
            self._count_totals()
            if self.summary.exit_code == exitcodes.OK:
                self.summary.exit_code, self.summary.message = _judge_errors(self.summary,
                                                                             self.cfg)
            assert self._out is not None
            _write_manifest(self.cfg, self._out, self.spec, self.summary, self.timings)

    def _count_totals(self) -> None:
        s = self.summary
        if self._pending is not None:
            s.skipped = self._pending.skipped
            first = self._pending.first_at
            if first is not None:
                self.timings["first_pending_seconds"] = round(first - self.started, 3)
        s.errors = sum(s.errors_by_kind.values())
        s.parts_written = len(self._writer.committed_parts) if self._writer else 0
        s.listed, s.ignored_files = self.stats.listed, self.stats.ignored
        s.duplicates = self.stats.duplicates
        s.wall_seconds = time.monotonic() - self.started
        processed = s.labeled + s.errors
        s.images_per_second = processed / s.wall_seconds if s.wall_seconds else 0.0

    def rescue(self) -> None:
        """The signal watchdog's way out (the main thread is stuck in native code, in the run
        or just after it was recorded): the manifest and the summary as the CLI would print
        them; the rows were committed by the writer's own rescue, which runs first."""
        with self._record_lock:
            if not self._recorded:
                self.interrupted()
        self._record()
        if self.cfg.json:
            print(json.dumps(dataclasses.asdict(self.summary)), flush=True)
        else:
            print(self.summary.line(), file=sys.stderr, flush=True)


def _write_results(batches: Generator[ResultBatch, None, None], writer: PartWriter,
                   run: Run) -> None:
    """Every result batch -> rows on the background writer, counted by `run`. On an exception
    (an interrupt included) the rows already received are committed before it propagates, and
    the engine is closed (a Ray cluster it started is shut down).

    The engine computes while the writer's thread builds and writes the rows: the slowest of
    reading, the model and writing sets the pace."""
    rows = BackgroundWriter(writer)
    stamp = RunStamp(run.spec.name, run.summary.run_id)
    try:
        # a signal while stuck in native code (tf.data, Ray): the watchdog commits what is queued
        with interrupts.rescue_with(rows.close), contextlib.closing(batches):
            for batch in batches:
                if "first_result_seconds" not in run.timings:  # start-up: model, graph, first batch
                    run.note_time("first_result_seconds")
                with interrupts.deferred():  # a signal lands before or after a batch is counted
                    _submit(rows, batch, run.count(batch), stamp, run.spec.labels)
                run.progress.update(len(batch.refs), len(batch.errors))
            run.note_time("last_result_seconds")
    finally:
        rows.close()


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


def _identity(spec: ModelSpec, plan: devices.Plan, limits: ReadLimits,
              embeddings: bool) -> Identity:
    """Everything that changes the scores: the model's weights and preprocessing, the runtime,
    the precision and the feed (uint8 pixels are rounded), as planned for this run, and full
    or reduced-scale JPEG decode; and whether rows must have embeddings."""
    return Identity(spec.name, spec.weights_sha256, spec.preprocess.describe(),
                    plan.runtime, devices.RECORDED_PRECISION[plan.precision],
                    plan.feed, "scaled" if limits.scaled_decode else "full", embeddings)


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
