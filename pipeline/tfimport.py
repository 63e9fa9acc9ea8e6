"""Import TensorFlow once, without the C++ start-up chatter that drowns a cron mail."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator


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
        for fd in fds:
            os.dup2(captured.fileno(), fd)
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
    for fd, copy in list(saved.items()):
        os.dup2(copy, fd)
        os.close(copy)
        del saved[fd]


def import_tensorflow_quietly():
    """Import tensorflow and enumerate devices with the C++ notices muted."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with muted_output():
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf
