"""One labeling run: lock, done set, progress, engine, run manifest, summary and exit code."""
from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import logging
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from . import (__version__, checkpoint, devices, exitcodes, interrupts, logs, models, runtime,
               storage)
from .config import ConfigError, RunConfig
from .engines import local
from .interrupts import Interrupted
from .progress import Progress
from .sources import ImageRef, SourceStats, iter_refs
from .writer import OutputError, PartWriter, RunStamp, new_run_id, write_json

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
    storage.configure(cfg)
    spec = models.get(cfg.model_request())
    cfg = _effective_top_k(cfg, spec)
    stats = SourceStats()
    refs = _nonempty(iter_refs(cfg.input, stats, cfg.inventory_prefix), cfg)  # before OUTPUT is touched
    _prepare_output(cfg.output)
    summary = RunSummary(cfg.run_id or new_run_id(), cfg.output, spec.name)
    progress = Progress(cfg.progress if not cfg.json else "none", cfg.log_interval)
    timings: dict[str, float] = {}  # seconds since the start, for the run manifest
    with interrupts.raised_on_signals(), checkpoint.lock(cfg.output, lease=cfg.s3_lock_lease):
        for note in checkpoint.recover(cfg.output):  # temp files, an interrupted compaction
            log.info(note)
        overwrite = _overwrite(cfg, spec.name, summary.run_id)
        replaced = frozenset(overwrite.remove if overwrite else ())
        identity = _identity(spec, cfg)
        done = checkpoint.done_set(cfg.output, identity, ignore=replaced)
        timings["done_set_seconds"] = round(time.monotonic() - started, 3)
        result = local.EngineResult()
        pending = _first_noted(_skip_done(refs, done, summary, result), timings, started)
        writer = PartWriter(cfg.output, summary.run_id, cfg.part_size,
                            _file_metadata(spec, cfg, identity))
        record = _Once(lambda: _record(cfg, spec, summary, started, result, writer, stats, progress,
                                       timings))
        with interrupts.rescue_with(lambda: _record_interrupted(record, summary, cfg.json)):
            try:
                _run_engine(pending, spec, writer, _stamp(spec, summary), cfg, progress, result)
                if interrupts.requested():  # the listing stopped early: not every input was seen
                    raise Interrupted("signal")
                if overwrite:
                    _complete_overwrite(overwrite, summary)
            except (Interrupted, KeyboardInterrupt):
                summary.exit_code, summary.message = exitcodes.INTERRUPTED, INTERRUPTED_MESSAGE
            except Exception as e:  # the manifest records the real exit code, the log the traceback
                _record_failure(e, cfg.output, summary)
                raise
            finally:
                record()
    return summary


def _effective_top_k(cfg: RunConfig, spec) -> RunConfig:
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


def _record(cfg: RunConfig, spec, summary: RunSummary, started: float, result,
            writer: PartWriter, stats: SourceStats, progress: Progress,
            timings: dict[str, float]) -> None:
    """The end of every run: counts, exit code, run manifest."""
    progress.close()
    _finish(summary, started, result, writer, stats)
    if summary.exit_code == exitcodes.OK:
        summary.exit_code, summary.message = _judge_errors(summary, cfg)
    _write_manifest(cfg, spec, summary, timings)


def _record_interrupted(record: _Once, summary: RunSummary, as_json: bool) -> None:
    """The signal watchdog's way out (the main thread is stuck in native code): the manifest
    and the summary as the CLI would print them; the rows were committed by the engine's own
    rescue, which runs first."""
    summary.exit_code, summary.message = exitcodes.INTERRUPTED, INTERRUPTED_MESSAGE
    record()
    if as_json:
        print(json.dumps(dataclasses.asdict(summary)), flush=True)
    else:
        print(summary.line(), file=sys.stderr, flush=True)


def _nonempty(refs: Iterator[ImageRef], cfg: RunConfig) -> Iterator[ImageRef]:
    """`refs` unchanged; ConfigError (exit 2) if there is none, unless cfg.allow_empty: an empty
    or unmounted folder, or an empty manifest, must not look like a quiet night."""
    first = next(refs, None)
    if first is None:
        if cfg.allow_empty:
            return iter(())
        raise ConfigError(f"no images in INPUT {cfg.input} (an empty or unmounted folder, or an "
                          "empty manifest?); pass --allow-empty (allow_empty = true) if this "
                          "feed may legitimately be empty")
    return itertools.chain([first], refs)


def _run_engine(pending, spec, writer: PartWriter, stamp: RunStamp, cfg: RunConfig,
                progress: Progress, result) -> None:
    if cfg.engine == "ray":
        from .engines import ray as ray_engine  # Ray is an optional extra

        ray_engine.run(pending, spec, writer, stamp, cfg, progress, result)
    else:
        local.run(pending, spec, runtime.load(spec, cfg.device_request()), writer, stamp, cfg, progress, result)


def _prepare_output(output: str) -> None:
    if storage.is_s3(output):
        storage.split(output)  # a bucket is named; S3 errors surface when the lock is taken
        storage.client()  # ConfigError now if boto3 is missing
        return
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"output {output} exists and is not a directory")
    try:
        os.makedirs(os.path.join(output, "_runs"), exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {output}: {e.strerror or e}") from e
    checkpoint.check_writable(output)


def _overwrite(cfg: RunConfig, model: str, run_id: str):
    """The --overwrite this run is part of: an unfinished one for `model`, or a new one."""
    rep = checkpoint.unfinished_overwrite(cfg.output, model)
    if rep is not None:
        log.info(f"continuing the unfinished --overwrite run {rep.id}: its {len(rep.remove)} "
                     "earlier part(s) are replaced when this run completes")
    elif cfg.overwrite:
        rep = checkpoint.start_overwrite(cfg.output, model, run_id)
    return rep


def _complete_overwrite(overwrite: checkpoint.Replacement, summary: RunSummary) -> None:
    with interrupts.deferred():
        overwrite.commit()
    summary.parts_replaced = len(overwrite.remove)


def _stamp(spec, summary: RunSummary) -> RunStamp:
    return RunStamp(spec.name, summary.run_id, spec.labels.ids, spec.labels.names)


def _identity(spec, cfg: RunConfig) -> checkpoint.Identity:
    """Everything that changes the scores. The runtime and precision are resolved for this host;
    on Ray each node resolves `auto` itself, so the request is recorded as given."""
    if cfg.engine == "ray":
        scores_runtime, precision = cfg.runtime, cfg.precision
    else:
        plan = devices.plan(cfg, devices.local_gpus())
        scores_runtime, precision = plan.runtime, plan.dtype_policy
    return checkpoint.Identity(spec.name, spec.weights_sha256, spec.preprocess.describe(),
                               scores_runtime, precision)


def _first_noted(refs: Iterator[ImageRef], timings: dict[str, float],
                 started: float) -> Iterator[ImageRef]:
    """`refs`, noting when the first one went to the reader (`first_pending_seconds`)."""
    for ref in refs:
        timings.setdefault("first_pending_seconds", round(time.monotonic() - started, 3))
        yield ref


def _skip_done(refs: Iterable[ImageRef], done: checkpoint.DoneSet, summary: RunSummary,
               result: local.EngineResult) -> Iterator[ImageRef]:
    """The refs that are not done; a ref that failed the same way last time is still retried,
    and `result` remembers its error kind (an identical failure is then not written again)."""
    for chunk in _chunks(refs):
        is_done, previous_error = done.check(chunk)
        for ref, skip, previous in zip(chunk, is_done, previous_error):
            if interrupts.requested():  # in a tf.data thread: end the stream, main thread raises
                return
            if skip:
                summary.skipped += 1
                continue
            if previous is not None:
                result.failed_before[ref.image_id] = previous
            yield ref


def _chunks(refs: Iterable[ImageRef], largest: int = 1024) -> Iterator[list[ImageRef]]:
    """Lists of 1, 2, 4, ... `largest` refs: a slow listing does not hold back the first image.
    A signal ends it between two refs, not only between two chunks."""
    chunk, size = [], 1
    for ref in refs:
        if interrupts.requested():
            return
        chunk.append(ref)
        if len(chunk) >= size:
            yield chunk
            chunk, size = [], min(size * 2, largest)
    if chunk:
        yield chunk


def _finish(summary: RunSummary, started: float, result, writer: PartWriter,
            stats: SourceStats) -> None:
    summary.labeled, summary.errors = result.labeled, result.errors
    summary.still_failing = result.still_failing
    summary.errors_by_kind = dict(result.errors_by_kind)
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


def _file_metadata(spec, cfg: RunConfig, identity: checkpoint.Identity) -> dict[str, str]:
    return {
        **identity.metadata(),  # model, weights_sha256, preprocessing, runtime, precision
        "pipeline.weights_source": spec.weights_source,
        "pipeline.top_k": str(cfg.top_k),
        "pipeline.version": __version__,
    }


def _record_failure(exc: Exception, output: str, summary: RunSummary) -> None:
    outcome = exitcodes.outcome(exc, INTERRUPTED_MESSAGE)
    summary.exit_code, summary.message = outcome.code, outcome.message
    if outcome.unexpected:
        exc.traceback_log = _write_traceback(output, summary.run_id, exc)


def _write_traceback(output: str, run_id: str, exc: Exception) -> str | None:
    """OUTPUT/_runs/<run_id>.log with the traceback; None if even that cannot be written."""
    uri = storage.join(storage.join(output, "_runs"), f"{run_id}.log")
    text = logs.format_traceback(exc).encode("utf-8")
    try:
        if storage.is_s3(output):
            storage.put_bytes(uri, text)
        else:
            with open(uri, "wb") as f:
                f.write(text)
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


def _write_manifest(cfg: RunConfig, spec, summary: RunSummary, timings: dict[str, float]) -> None:
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
            write_json(storage.join(cfg.output, "_runs"), f"{summary.run_id}.json", manifest)
    except OutputError as e:  # the parts are what counts; a full disk must not hide the real error
        log.warning(f"run manifest not written: {e}")
