"""Import TensorFlow once, without the C++ start-up chatter that drowns a cron mail."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from typing import Iterator

# The saved copies of the fds each active mute replaced, outermost first (unmute_for_exit).
_active: list[dict[int, int]] = []
_lock = threading.Lock()


@contextlib.contextmanager
def muted_output(stdout: bool = False) -> Iterator[None]:
    """Mute fd 2 (and fd 1 if `stdout`) at the OS level, where native code writes; if the block
    raises, the captured text goes to stderr so the failure stays explained.

    Needed because TensorFlow's C++ notices are written before its log level applies (so
    TF_CPP_MIN_LOG_LEVEL cannot silence them), and the LiteRT converter prints to stdout, which
    carries the --json summary.
    """
    fds = (1, 2) if stdout else (2,)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    with tempfile.TemporaryFile() as captured:
        with _lock:
            for fd in fds:
                os.dup2(captured.fileno(), fd)
            _active.append(saved)
        try:
            yield
        except BaseException:
            _restore(saved)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            _restore(saved)


def _restore(saved: dict[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    with _lock:
        for fd, copy in list(saved.items()):
            os.dup2(copy, fd)
            os.close(copy)
            del saved[fd]
        _active[:] = [s for s in _active if s is not saved]


def unmute_for_exit() -> None:
    """Point fds 1 and 2 back where they were before any mute, for good: the signal watchdog
    ends the process while the main thread is stuck in muted native code (the LiteRT
    converter), and its summary and message must reach the log, not the capture file."""
    with _lock:
        for fd in (1, 2):
            original = next((saved[fd] for saved in _active if fd in saved), None)
            if original is not None:
                os.dup2(original, fd)


def import_tensorflow_quietly():
    """Import tensorflow and enumerate devices with the C++ notices muted."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with muted_output():
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf
