"""One labeling run: lock, done set, progress, engine, run manifest, summary and exit code."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import secrets
import signal
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from . import __version__, checkpoint, models, runtime
from .config import ConfigError, RunConfig
from .progress import Progress
from .sources import ImageRef, SourceStats, describe_input, iter_refs
from .writer import PartWriter, RunStamp

EXIT_OK = 0
EXIT_TOO_MANY_ERRORS = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_FATAL = 4
EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; finished rows are committed before the run ends."""


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
    wall_seconds: float = 0.0
    images_per_second: float = 0.0
    exit_code: int = EXIT_OK
    message: str = ""

    def line(self) -> str:
        return (f"labeled {self.labeled}, errors {self.errors}, skipped {self.skipped} "
                f"(already done), {self.images_per_second:.1f} images/s, "
                f"wall {self.wall_seconds:.1f}s -> {self.output}")


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def label(cfg: RunConfig) -> RunSummary:
    """Label cfg.input into cfg.output; see RunSummary.exit_code for the outcome."""
    started = time.monotonic()
    run_id = cfg.run_id or new_run_id()
    spec = models.get(cfg.model, cfg)
    describe_input(cfg.input)  # a wrong INPUT is a usage error before OUTPUT is touched
    _prepare_output(cfg.output)
    summary = RunSummary(run_id, cfg.output, spec.name)
    progress = Progress(cfg.progress if not cfg.json else "none", cfg.log_interval)
    with checkpoint.lock(cfg.output), _signals_raise_interrupted():
        checkpoint.remove_temp_files(cfg.output)
        done = checkpoint.done_keys(cfg.output, spec.name)
        stats = SourceStats()
        pending = _skip_done(iter_refs(cfg.input, stats), done, summary)
        predictor = runtime.load(spec, cfg)
        writer = PartWriter(cfg.output, run_id, cfg.part_size, _file_metadata(spec, cfg))
        stamp = RunStamp(spec.name, run_id, spec.labels.ids, spec.labels.names)
        from .engines import local

        result = local.EngineResult()
        try:
            local.run(pending, spec, predictor, writer, stamp, cfg, progress, result)
        except (Interrupted, KeyboardInterrupt):
            summary.exit_code = EXIT_INTERRUPTED
            summary.message = "interrupted, run the same command again to resume"
        finally:
            progress.close()
            summary.labeled, summary.errors = result.labeled, result.errors
            summary.errors_by_kind = dict(result.errors_by_kind)
            summary.parts_written = len(writer.committed_parts)
            summary.listed, summary.ignored_files = stats.listed, stats.ignored
            summary.duplicates = stats.duplicates
            _finish(summary, started, cfg)
            _write_manifest(cfg, spec, summary)
    if summary.exit_code == EXIT_OK:
        summary.exit_code, summary.message = _judge_errors(summary, cfg)
    return summary


def _prepare_output(output: str) -> None:
    if output.startswith("s3://"):
        raise ConfigError("s3:// outputs are not supported yet")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"output {output} exists and is not a directory")
    os.makedirs(os.path.join(output, "_runs"), exist_ok=True)
    if not os.access(output, os.W_OK):
        raise PermissionError(f"output directory {output} is not writable")


def _skip_done(refs: Iterable[ImageRef], done: dict, summary: RunSummary) -> Iterator[ImageRef]:
    for ref in refs:
        if checkpoint.is_done(ref, done):
            summary.skipped += 1
        else:
            yield ref


def _finish(summary: RunSummary, started: float, cfg: RunConfig) -> None:
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


def _file_metadata(spec, cfg: RunConfig) -> dict[str, str]:
    return {
        "pipeline.model": spec.name,
        "pipeline.weights_sha256": spec.weights_sha256,
        "pipeline.weights_source": spec.weights_source,
        "pipeline.preprocessing": spec.preprocess.describe(),
        "pipeline.top_k": str(cfg.top_k),
        "pipeline.version": __version__,
    }


def _versions() -> dict[str, str]:
    import numpy
    import pyarrow
    import tensorflow as tf

    return {"pipeline": __version__, "python": platform.python_version(),
            "tensorflow": tf.__version__, "numpy": numpy.__version__, "pyarrow": pyarrow.__version__}


def _write_manifest(cfg: RunConfig, spec, summary: RunSummary) -> None:
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
    path = os.path.join(cfg.output, "_runs", f"{summary.run_id}.json")
    tmp = os.path.join(cfg.output, "_runs", f".tmp-{summary.run_id}.json")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, default=str)
    os.replace(tmp, path)


class _signals_raise_interrupted:
    """Turn SIGTERM into Interrupted (SIGINT already raises KeyboardInterrupt)."""

    def __enter__(self):
        self._old = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            raise Interrupted(signal.Signals(signum).name)

        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False
