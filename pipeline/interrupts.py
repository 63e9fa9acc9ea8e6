"""SIGTERM/SIGINT/SIGHUP become an `Interrupted` exception in the main thread, except inside
`deferred()`. SIGHUP (a closed ssh session or terminal) is left alone when it was ignored on
entry, as `nohup` asks.

Python runs signal handlers in the main thread only, and only between bytecodes; while the main
thread waits inside native code (tf.data waiting for the listing to fill a batch) the handler
cannot run. `requested()` turns true the moment a signal arrives (a wakeup fd read by a small
thread), so the listing generator can stop early and let the main thread see the interrupt.

The main thread can also be stuck for a long time in native code (a slow decode it waits for,
tf.data's teardown waiting for one): `exit_when_stuck()` gives it a grace period after a signal,
then runs the `rescue_with()` callbacks (commit the finished rows, write the run manifest,
release the lock) on a watchdog thread and ends the process.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator

from . import tfimport
from .exitcodes import ExitError, InterruptError

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_requested = threading.Event()
_state: dict[str, Any] = {"deferring": 0, "pending": None}
_rescues: list[Callable[[], None]] = []


class Interrupted(InterruptError):
    """SIGTERM or SIGINT arrived; finished rows are committed before the run ends."""


def requested() -> bool:
    """True once SIGTERM/SIGINT has arrived (safe to call from any thread)."""
    return _requested.is_set()


def disguised(e: BaseException) -> bool:
    """An Interrupted that library code turned into an error of its own: raised while
    TensorFlow's pybind11 layer builds an exception (tf.data ending because the listing stopped
    on the signal), it becomes a RuntimeError naming the replacement; raised inside the LiteRT
    converter's tracing, it leaves Keras half set up and a TypeError follows. Any unexpected
    error once a signal has arrived is taken as the interrupt (exit 130: run again to resume);
    the project's own errors (usage, S3 down, a lost lock) keep their exit codes."""
    return requested() and not isinstance(e, ExitError)


def _handler(signum, frame) -> None:
    _requested.set()
    name = signal.Signals(signum).name
    if _state["deferring"]:
        _state["pending"] = name
        return
    raise Interrupted(name)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A critical section (committing a part): a signal inside it is raised when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only
        return
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    if not _state["deferring"] and _state["pending"]:
        pending, _state["pending"] = _state["pending"], None
        raise Interrupted(pending)


@contextlib.contextmanager
def raised_on_signals() -> Iterator[None]:
    """Install the handlers (main thread only; elsewhere this does nothing). Nestable."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read_fd,), name="signal-watch", daemon=True)
    watcher.start()
    for s in SIGNALS:
        if not (s == signal.SIGHUP and old[s] == signal.SIG_IGN):  # nohup
            signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(old_wakeup)
        os.close(write_fd)  # the watcher reads what is left, then EOF, and ends
        # before returning: a byte it had not read yet must not mark a later run as interrupted
        watcher.join(timeout=5)


def _watch(read_fd: int) -> None:
    try:
        while data := os.read(read_fd, 64):
            if any(b in (int(s) for s in SIGNALS) for b in data):
                _requested.set()
    finally:
        os.close(read_fd)


def reset() -> None:
    """Forget an earlier interrupt (a library caller starting a new run in the same process)."""
    _requested.clear()
    _state["pending"] = None


# After a signal, how long the main thread may take to wind down on its own (committing a part
# takes milliseconds; a decode stuck in native code can take minutes).
GRACE_SECONDS = 3.0


@contextlib.contextmanager
def rescue_with(callback: Callable[[], None]) -> Iterator[None]:
    """While inside: should exit_when_stuck end the process, call `callback` first (innermost
    first). Callbacks run on the watchdog thread, so they must be safe to run concurrently
    with the main thread doing the same thing (make them idempotent, behind a lock)."""
    _rescues.append(callback)
    try:
        yield
    finally:
        _rescues.remove(callback)


@contextlib.contextmanager
def exit_when_stuck(exit_code: int, message: str, grace: float = GRACE_SECONDS) -> Iterator[None]:
    """While inside: once SIGTERM/SIGINT has arrived, the main thread has `grace` seconds to
    leave the block; if it has not, the rescue callbacks run and the process ends with
    `exit_code` (os._exit: a thread stuck in native code cannot be stopped any other way)."""
    left = threading.Event()
    watchdog = threading.Thread(target=_watchdog, args=(left, grace, exit_code, message),
                                name="signal-watchdog", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        left.set()


def _watchdog(left: threading.Event, grace: float, exit_code: int, message: str) -> None:
    while not _requested.wait(0.2):
        if left.is_set():
            return
    if left.wait(grace):
        return
    tfimport.unmute_for_exit()
    for callback in reversed(list(_rescues)):
        try:
            callback()
        except BaseException as e:  # noqa: BLE001 -- the others must still run
            print(f"error while ending the run: {type(e).__name__}: {e}", file=sys.stderr)
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(exit_code)
