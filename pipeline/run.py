"""One labeling run: lock, done set, progress, engine, run manifest, summary and exit code."""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from . import __version__, checkpoint, devices, interrupts, models, runtime, storage
from .config import ConfigError, RunConfig
from .engines import local
from .interrupts import Interrupted
from .progress import Progress
from .sources import ImageRef, SourceStats, describe_input, iter_refs
from .writer import OutputError, PartWriter, RunStamp, new_run_id, write_json

EXIT_OK = 0
EXIT_TOO_MANY_ERRORS = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_FATAL = 4
EXIT_INTERRUPTED = 130


INTERRUPTED_MESSAGE = "interrupted, run the same command again to resume"
SKIP_CHUNK = 1024  # listed refs looked up in the done set at a time


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
    storage.configure(cfg)
    spec = models.get(cfg.model, cfg)
    describe_input(cfg.input)  # a wrong INPUT is a usage error before OUTPUT is touched
    _prepare_output(cfg.output)
    summary = RunSummary(cfg.run_id or new_run_id(), cfg.output, spec.name)
    progress = Progress(cfg.progress if not cfg.json else "none", cfg.log_interval)
    timings: dict[str, float] = {}
    with interrupts.raised_on_signals(), checkpoint.lock(cfg.output, lease=cfg.s3_lock_lease):
        for note in checkpoint.recover(cfg.output):  # temp files, an interrupted compaction
            progress.log(note)
        overwrite = _overwrite(cfg, spec.name, summary.run_id, progress)
        replaced = frozenset(overwrite.remove if overwrite else ())
        identity = _identity(spec, cfg)
        done = checkpoint.done_set(cfg.output, identity, ignore=replaced)
        timings["done_set_seconds"] = round(time.monotonic() - started, 3)
        stats, result = SourceStats(), local.EngineResult()
        pending = _skip_done(iter_refs(cfg.input, stats), done, summary, timings, started)
        writer = PartWriter(cfg.output, summary.run_id, cfg.part_size,
                            _file_metadata(spec, cfg, identity))
        try:
            _run_engine(pending, spec, writer, _stamp(spec, summary), cfg, progress, result)
            if interrupts.requested():  # the listing stopped early: not every input was seen
                raise Interrupted("signal")
            if overwrite:
                _complete_overwrite(overwrite, summary)
        except (Interrupted, KeyboardInterrupt):
            summary.exit_code, summary.message = EXIT_INTERRUPTED, INTERRUPTED_MESSAGE
        finally:
            progress.close()
            _finish(summary, started, result, writer, stats)
            _write_manifest(cfg, spec, summary, timings)
    if summary.exit_code == EXIT_OK:
        summary.exit_code, summary.message = _judge_errors(summary, cfg)
    return summary


def _run_engine(pending, spec, writer: PartWriter, stamp: RunStamp, cfg: RunConfig,
                progress: Progress, result) -> None:
    if cfg.engine == "ray":
        from .engines import ray as ray_engine  # Ray is an optional extra

        ray_engine.run(pending, spec, writer, stamp, cfg, progress, result)
    else:
        local.run(pending, spec, runtime.load(spec, cfg), writer, stamp, cfg, progress, result)


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


def _overwrite(cfg: RunConfig, model: str, run_id: str, progress: Progress):
    """The --overwrite this run is part of: an unfinished one for `model`, or a new one."""
    rep = checkpoint.unfinished_overwrite(cfg.output, model)
    if rep is not None:
        progress.log(f"continuing the unfinished --overwrite run {rep.id}: its {len(rep.remove)} "
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


def _skip_done(refs: Iterable[ImageRef], done: checkpoint.DoneSet, summary: RunSummary,
               timings: dict[str, float], started: float) -> Iterator[ImageRef]:
    """The refs that are not done, looked up a chunk at a time."""
    for chunk in _chunks(refs, SKIP_CHUNK):
        is_done, _ = done.check(chunk)
        summary.skipped += int(is_done.sum())
        for ref, skip in zip(chunk, is_done):
            if not skip:
                if "first_pending_seconds" not in timings:
                    timings["first_pending_seconds"] = round(time.monotonic() - started, 3)
                yield ref


def _chunks(refs: Iterable[ImageRef], limit: int) -> Iterator[list[ImageRef]]:
    """Chunks growing from 1 ref to `limit`, so a slow listing does not hold back the first
    images. Runs in a tf.data thread: on a signal the stream ends and the main thread raises."""
    chunk, size = [], 1
    for ref in refs:
        if interrupts.requested():
            return
        chunk.append(ref)
        if len(chunk) >= size:
            yield chunk
            chunk, size = [], min(2 * size, limit)
    if chunk and not interrupts.requested():
        yield chunk


def _finish(summary: RunSummary, started: float, result, writer: PartWriter,
            stats: SourceStats) -> None:
    summary.labeled, summary.errors = result.labeled, result.errors
    summary.errors_by_kind = dict(result.errors_by_kind)
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


def _file_metadata(spec, cfg: RunConfig, identity: checkpoint.Identity) -> dict[str, str]:
    return {
        **identity.metadata(),  # model, weights_sha256, preprocessing, runtime, precision
        "pipeline.weights_source": spec.weights_source,
        "pipeline.top_k": str(cfg.top_k),
        "pipeline.version": __version__,
    }


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
        "timings": timings,  # seconds since the start: done set built, first new image read
        "host": platform.node(),
        "versions": _versions(),
    }
    try:
        with interrupts.deferred():
            write_json(storage.join(cfg.output, "_runs"), f"{summary.run_id}.json", manifest)
    except OutputError as e:  # the parts are what counts; a full disk must not hide the real error
        print(f"warning: run manifest not written: {e}", file=sys.stderr)
