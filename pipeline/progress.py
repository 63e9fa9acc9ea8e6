"""Progress: a tqdm bar on a terminal, otherwise a plain log line every ~30 s (cron mail)."""
from __future__ import annotations

import logging
import sys
import time

from . import logs

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, mode: str = "auto", interval: float = 30.0, stream=None):
        self._stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self._stream.isatty() else "log"
        self._mode = mode
        self._interval = interval
        self._start = self._last_log = time.monotonic()
        self.labeled = 0
        self.errors = 0
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            bar = self._bar = tqdm(unit="img", file=self._stream, dynamic_ncols=True, smoothing=0.1)
            logs.route_through(lambda line: bar.write(line, file=self._stream))

    def update(self, labeled: int, errors: int) -> None:
        self.labeled += labeled
        self.errors += errors
        if self._bar is not None:
            self._bar.update(labeled + errors)
            self._bar.set_postfix(errors=self.errors, refresh=False)
        elif self._mode == "log":
            now = time.monotonic()
            if now - self._last_log >= self._interval:
                self._last_log = now
                log.info(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        done = self.labeled + self.errors
        rate = done / elapsed if elapsed > 0 else 0.0
        return (f"{done} images ({self.labeled} labeled, {self.errors} errors) in "
                f"{elapsed:.0f}s, {rate:.1f} images/s")

    def close(self) -> None:
        if self._bar is not None:
            logs.route_through(None)
            self._bar.close()
