"""What is done (from committed parts), incremental skip, temp-file cleanup, the output lock."""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
from typing import Iterator

import pyarrow.dataset as ds

from .sources import ImageRef
from .writer import PART_PREFIX, TMP_PREFIX

LOCK_NAME = "_lock"
# Errors that say something about the file itself: not retried while the file is unchanged.
PERMANENT_ERRORS = frozenset({"empty_file", "corrupt", "unsupported_format", "too_large"})


class OutputLocked(RuntimeError):
    """Another run holds the output; exit code 3."""


def part_files(output: str) -> list[str]:
    try:
        names = os.listdir(output)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(output, n) for n in names
                  if n.startswith(PART_PREFIX) and n.endswith(".parquet"))


def remove_temp_files(output: str) -> int:
    """Delete temp parts left by a crashed run; returns how many."""
    removed = 0
    for name in os.listdir(output):
        if name.startswith(TMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(output, name))
                removed += 1
    return removed


def done_keys(output: str, model: str) -> dict[str, tuple[int | None, int | None]]:
    """image_id -> (file_size, mtime in us) of the latest row for `model` that needs no redo."""
    files = part_files(output)
    if not files:
        return {}
    dataset = ds.dataset(files, format="parquet")
    columns = ["image_id", "file_size", "mtime", "status", "error_kind", "labeled_at"]
    table = dataset.to_table(columns=columns, filter=ds.field("model") == model)
    table = table.sort_by([("labeled_at", "ascending")])
    done: dict[str, tuple[int | None, int | None]] = {}
    mtimes = table.column("mtime").cast("int64").to_pylist()
    for image_id, size, mtime, status, kind in zip(
        table.column("image_id").to_pylist(), table.column("file_size").to_pylist(), mtimes,
        table.column("status").to_pylist(), table.column("error_kind").to_pylist(),
    ):
        if status == "ok" or kind in PERMANENT_ERRORS:
            done[image_id] = (size, mtime)
        else:
            done.pop(image_id, None)
    return done


def is_done(ref: ImageRef, done: dict[str, tuple[int | None, int | None]]) -> bool:
    seen = done.get(ref.image_id)
    if seen is None:
        return False
    mtime_us = None if ref.mtime_ns is None else ref.mtime_ns // 1000
    return seen == (ref.file_size, mtime_us)


@contextlib.contextmanager
def lock(output: str) -> Iterator[None]:
    """Hold an exclusive flock on OUTPUT/_lock; the kernel releases it if we are killed."""
    path = os.path.join(output, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(_holder_message(path)) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder_message(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            h = json.load(f)
        who = f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (OSError, ValueError, KeyError):
        who = "another process"
    return f"output is locked by {who}; wait for it to finish (lock file {path})"
