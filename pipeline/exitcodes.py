"""Exit codes of every command, and the one mapping from an exception to a code and a line.

A leaf module: it imports nothing of the project. The project's exceptions derive from the
bases below (ConfigError here, from UsageError; OutputLocked from LockedError, OutputError and
S3Unavailable from FatalError, Interrupted from InterruptError), so `outcome` needs no list of
them. Anything else is unexpected: exit 4 with one line naming it; the traceback goes to a log.
"""
from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass

OK = 0
TOO_MANY_ERRORS = 1  # new per-image errors above --max-error-rate
USAGE = 2  # usage or config error, unusable data, an INPUT with no images
LOCKED = 3  # OUTPUT (or a bundle) is held by another run
FATAL = 4  # anything else: unwritable output, S3 unreachable, an unexpected exception
INTERRUPTED = 130  # SIGINT/SIGTERM/SIGHUP, after committing what was done
INTERRUPTED_MESSAGE = "interrupted, run the same command again to resume"

HELP = (
    "Exit codes: 0 success (a failure unchanged since the last run is reported, not counted "
    "again); 1 new per-image errors above --max-error-rate; 2 usage or config error, or no "
    "images in INPUT (unless --allow-empty); 3 OUTPUT is locked by another run; 4 any other "
    "failure (OUTPUT unwritable, S3 unreachable, an unexpected error: one line, the traceback "
    "in OUTPUT/_runs/<run_id>.log); 130 interrupted (finished work is kept: run the same "
    "command again to resume)."
)


class ExitError(Exception):
    """An anticipated failure: its message is the whole story, plus an optional hint."""

    exit_code = FATAL
    hint = ""  # what to do about it, added to the printed line


class UsageError(ExitError):
    exit_code = USAGE


class ConfigError(UsageError, ValueError):
    """A usage or configuration mistake; the CLI turns it into exit code 2."""


class LockedError(ExitError):
    exit_code = LOCKED


class FatalError(ExitError):
    exit_code = FATAL


class InterruptError(ExitError):
    exit_code = INTERRUPTED


@dataclass(frozen=True)
class Outcome:
    code: int
    message: str
    unexpected: bool = False  # a bug or an unanticipated environment: worth a traceback


def outcome(exc: BaseException, interrupted_message: str) -> Outcome:
    """What a command that ended with `exc` exits with, and the one line it prints."""
    if isinstance(exc, (InterruptError, KeyboardInterrupt)):
        return Outcome(INTERRUPTED, interrupted_message)
    if isinstance(exc, ExitError):
        return Outcome(exc.exit_code, f"{exc}; {exc.hint}" if exc.hint else str(exc))
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return Outcome(FATAL, f"{exc.strerror or exc}{where}")
    return Outcome(FATAL, f"unexpected {describe_unexpected(exc)}", unexpected=True)


def describe_unexpected(exc: BaseException) -> str:
    """`ValueError in pipeline/runtime.py:123 (predict): first line of the message`."""
    first = _headline(str(exc)).removeprefix(f"{type(exc).__name__}: ")
    if len(first) > 300:
        first = first[:297] + "..."
    return f"{type(exc).__name__}{_where(exc)}{': ' + first if first else ''}"


def _headline(text: str) -> str:
    """The first line of a message; if that is a header ("in user code:", as TensorFlow's
    graph errors begin), the first nested `SomeError: ...` line, which names what failed."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    if lines[0].endswith(":"):
        nested = next((line for line in lines if _NESTED_ERROR.match(line)), None)
        if nested:
            return nested
    return lines[0]


_NESTED_ERROR = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): \S")


def _where(exc: BaseException) -> str:
    """The innermost frame in this package (what failed), else the innermost frame at all."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    package = os.path.dirname(os.path.abspath(__file__))
    ours = [f for f in frames if os.path.abspath(f.filename).startswith(package + os.sep)]
    frame = (ours or frames)[-1]
    name = os.path.relpath(frame.filename, os.path.dirname(package)) if ours else frame.filename
    return f" in {name}:{frame.lineno} ({frame.name})"
