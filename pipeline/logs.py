"""Standard `logging` for every command: one formatter, stderr, through tqdm while a bar shows.

Messages are for people reading a terminal or a cron mail: `2026-12-02 01:30:00 text`, with
`warning: ` / `error: ` before warnings and errors. Modules log to `logging.getLogger(__name__)`
(children of "pipeline"); `setup` is called once by the CLI.
"""
from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable

ROOT = "pipeline"
_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class _Formatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(prefix)s%(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.prefix = _PREFIX.get(record.levelno, "")
        return super().format(record)


class _Handler(logging.Handler):
    """Writes to the stream the CLI had at setup, or through `writer` (a tqdm bar's write)."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream
        self.writer: Callable[[str], None] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self.writer is not None:
                self.writer(line)
            else:
                self.stream.write(line + "\n")
                self.stream.flush()
        except Exception:  # a closed stream must not take the run down with it
            self.handleError(record)


def setup(level: int = logging.INFO, stream=None) -> None:
    """Send the project's log records to `stream` (stderr) with the one formatter. Idempotent."""
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(h)
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def route_through(writer: Callable[[str], None] | None) -> None:
    """Write log lines with `writer` (e.g. tqdm.write, so a progress bar is not torn); None undoes."""
    for h in logging.getLogger(ROOT).handlers:
        if isinstance(h, _Handler):
            h.writer = writer


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
