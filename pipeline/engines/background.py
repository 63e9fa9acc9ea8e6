"""Write parts on a background thread, so decoding, inference and Parquet writing overlap."""
from __future__ import annotations

import queue
import threading
from typing import Callable

import pyarrow as pa

from ..writer import PartWriter

_STOP = object()
# Tables waiting for the writer. Building and writing rows takes milliseconds per batch, so two
# are enough to overlap; each one queued is finished work a SIGKILL would lose.
MAX_QUEUED = 2


class BackgroundWriter:
    """Feeds a PartWriter from a thread behind a bounded queue.

    `submit` takes a function that builds the rows, so building them (top-k, Arrow arrays) runs
    on the writer thread too. An error on that thread (e.g. disk full) is raised in the caller at
    its next `submit` or at `close`, and nothing more is written. `close` adds every table
    queued before it and commits the last part, also when the caller is unwinding from an
    interrupt, so finished rows are kept.
    """

    def __init__(self, writer: PartWriter, max_queued: int = MAX_QUEUED):
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(max_queued)
        self._error: BaseException | None = None
        self._error_raised = False
        self._closing = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="part-writer", daemon=True)
        self._thread.start()

    def submit(self, build_rows: Callable[[], pa.Table]) -> None:
        while True:
            self._raise_error()
            try:
                self._queue.put(build_rows, timeout=0.1)
                return
            except queue.Full:  # writer is behind (or dead: checked on the next round)
                continue

    def close(self) -> None:
        """Drain the queue, stop the thread, commit the last part; raise the thread's error.
        Safe to call twice and from two threads (a signal watchdog may call it while the main
        thread is stuck): the first call does the work, the others wait for it."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._close()

    def _close(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()
        if self._error is not None:
            self._raise_error()
            return
        self._writer.commit()

    def _raise_error(self) -> None:
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._writer.add(item())
            except BaseException as e:  # handed to the caller's thread
                self._error = e
                return
