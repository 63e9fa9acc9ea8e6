"""One labeling run: lock, done set, engine, part writer, counting, progress, run manifest,
summary and exit code. `label` is the whole job; the engine only computes."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from . import __version__, checkpoint, engines, interrupts, models, storage
from .config import ConfigError, RunConfig
from .engines import EngineJob, ResultBatch
from .interrupts import Interrupted
from .progress import Progress
from .sources import SourceStats, describe_input, iter_refs
from .types import ImageRef, Labels, ModelSpec, S3Options
from .writer import (BackgroundWriter, OutputError, PartWriter, RunStamp, error_table, new_run_id,
                     prediction_table, write_json)

EXIT_OK = 0
EXIT_TOO_MANY_ERRORS = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_FATAL = 4
EXIT_INTERRUPTED = 130


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
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    ignored_files: int = 0
    duplicates: int = 0
    parts_written: int = 0
    parts_replaced: int = 0  # removed by a completed --overwrite
    wall_seconds: float = 0.0
    images_per_second: float = 0.0
    exit_code: int = EXIT_OK
    message: str = ""

    def line(self) -> str:
        return (f"labeled {self.labeled}, errors {self.errors}, skipped {self.skipped} "
                f"(already done), {self.images_per_second:.1f} images/s, "
                f"wall {self.wall_seconds:.1f}s -> {self.output}")


def label(cfg: RunConfig) -> RunSummary:
    """Label cfg.input into cfg.output; see RunSummary.exit_code for the outcome."""
    started = time.monotonic()
    interrupts.reset()
    s3 = cfg.s3_options()
    spec = models.get(cfg.model_request())
    describe_input(cfg.input, s3)  # a wrong INPUT is a usage error before OUTPUT is touched
    _prepare_output(cfg.output, s3)
    engine = engines.get(cfg.engine)
    job = EngineJob(spec, cfg.device_request(), cfg.read_limits(), s3, cfg.top_k, cfg.ray_address)
    summary = RunSummary(cfg.run_id or new_run_id(), cfg.output, spec.name)
    progress = Progress(cfg.progress if not cfg.json else "none", cfg.log_interval)
    with interrupts.raised_on_signals(), checkpoint.lock(cfg.output, lease=cfg.s3_lock_lease, s3=s3):
        for note in checkpoint.recover(cfg.output, s3):  # temp files, an interrupted compaction
            progress.log(note)
        overwrite = _overwrite(cfg, spec.name, summary.run_id, progress, s3)
        replaced = frozenset(overwrite.remove if overwrite else ())
        done = checkpoint.done_keys(cfg.output, spec.name, ignore=replaced, s3=s3)
        stats = SourceStats()
        pending = _skip_done(iter_refs(cfg.input, stats, s3), done, summary)
        writer = PartWriter(cfg.output, summary.run_id, cfg.part_size,
                            _file_metadata(spec, cfg.top_k), s3)
        try:
            _write_results(engine(pending, job), writer, RunStamp(spec.name, summary.run_id),
                           spec.labels, summary, progress)
            if interrupts.requested():  # the listing stopped early: not every input was seen
                raise Interrupted("signal")
            if overwrite:
                _complete_overwrite(overwrite, summary)
        except (Interrupted, KeyboardInterrupt):
            summary.exit_code, summary.message = EXIT_INTERRUPTED, INTERRUPTED_MESSAGE
        finally:
            progress.close()
            _finish(summary, started, writer, stats)
            _write_manifest(cfg, spec, summary, s3)
    if summary.exit_code == EXIT_OK:
        summary.exit_code, summary.message = _judge_errors(summary, cfg)
    return summary


def _write_results(batches: Iterator[ResultBatch], writer: PartWriter, stamp: RunStamp,
                   labels: Labels, summary: RunSummary, progress: Progress) -> None:
    """Every result batch -> rows on the background writer, counted into `summary`. On an
    exception (an interrupt included) the rows already received are committed before it
    propagates, and the engine is closed (a Ray cluster it started is shut down).

    The engine computes while the writer's thread builds and writes the rows: the slowest of
    reading, the model and writing sets the pace."""
    rows = BackgroundWriter(writer)
    try:
        with contextlib.closing(batches):
            for batch in batches:
                with interrupts.deferred():  # a signal lands before or after a batch is counted
                    _submit(rows, batch, stamp, labels)
                    _count(summary, batch)
                progress.update(len(batch.refs), len(batch.errors))
    finally:
        rows.close()


def _submit(rows: BackgroundWriter, batch: ResultBatch, stamp: RunStamp, labels: Labels) -> None:
    if batch.refs:
        rows.submit(functools.partial(prediction_table, batch.refs, batch.widths, batch.heights,
                                      batch.top_idx, batch.top_scores, stamp, labels))
    if batch.errors:
        rows.submit(functools.partial(error_table, batch.errors, stamp))


def _count(summary: RunSummary, batch: ResultBatch) -> None:
    summary.labeled += len(batch.refs)
    for error in batch.errors:
        summary.errors_by_kind[error.kind] = summary.errors_by_kind.get(error.kind, 0) + 1


def _prepare_output(output: str, s3: S3Options) -> None:
    if storage.is_s3(output):
        storage.split(output)  # a bucket is named; S3 errors surface when the lock is taken
        storage.client(s3)  # ConfigError now if boto3 is missing
        return
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"output {output} exists and is not a directory")
    try:
        os.makedirs(os.path.join(output, "_runs"), exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {output}: {e.strerror or e}") from e
    checkpoint.check_writable(output)


def _overwrite(cfg: RunConfig, model: str, run_id: str, progress: Progress, s3: S3Options):
    """The --overwrite this run is part of: an unfinished one for `model`, or a new one."""
    rep = checkpoint.unfinished_overwrite(cfg.output, model, s3)
    if rep is not None:
        progress.log(f"continuing the unfinished --overwrite run {rep.id}: its {len(rep.remove)} "
                     "earlier part(s) are replaced when this run completes")
    elif cfg.overwrite:
        rep = checkpoint.start_overwrite(cfg.output, model, run_id, s3)
    return rep


def _complete_overwrite(overwrite: checkpoint.Replacement, summary: RunSummary) -> None:
    with interrupts.deferred():
        overwrite.commit()
    summary.parts_replaced = len(overwrite.remove)


def _skip_done(refs: Iterable[ImageRef], done: dict, summary: RunSummary) -> Iterator[ImageRef]:
    for ref in refs:
        if interrupts.requested():  # runs in a tf.data thread: end the stream, main thread raises
            return
        if checkpoint.is_done(ref, done):
            summary.skipped += 1
        else:
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
    processed = summary.labeled + summary.errors
    if processed == 0:
        if summary.skipped:
            return EXIT_OK, "nothing new to label: every input is already in the output"
        return EXIT_OK, "no images found in the input"
    rate = summary.errors / processed
    if rate > cfg.max_error_rate:
        return EXIT_TOO_MANY_ERRORS, (
            f"{summary.errors} of {processed} images failed ({rate:.1%}), above "
            f"--max-error-rate {cfg.max_error_rate:.1%}")
    return EXIT_OK, ""


def _file_metadata(spec: ModelSpec, top_k: int) -> dict[str, str]:
    return {
        "pipeline.model": spec.name,
        "pipeline.weights_sha256": spec.weights_sha256,
        "pipeline.weights_source": spec.weights_source,
        "pipeline.preprocessing": spec.preprocess.describe(),
        "pipeline.top_k": str(top_k),
        "pipeline.version": __version__,
    }


def _versions() -> dict[str, str]:
    import numpy
    import pyarrow
    import tensorflow as tf

    return {"pipeline": __version__, "python": platform.python_version(),
            "tensorflow": tf.__version__, "numpy": numpy.__version__, "pyarrow": pyarrow.__version__}


def _write_manifest(cfg: RunConfig, spec: ModelSpec, summary: RunSummary, s3: S3Options) -> None:
    manifest = {
        "run_id": summary.run_id,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "model": {"name": spec.name, "weights_sha256": spec.weights_sha256,
                  "weights_source": spec.weights_source, "preprocessing": spec.preprocess.describe()},
        "summary": dataclasses.asdict(summary),
        "host": platform.node(),
        "versions": _versions(),
    }
    try:
        with interrupts.deferred():
            write_json(storage.join(cfg.output, "_runs"), f"{summary.run_id}.json", manifest, s3)
    except OutputError as e:  # the parts are what counts; a full disk must not hide the real error
        print(f"warning: run manifest not written: {e}", file=sys.stderr)
