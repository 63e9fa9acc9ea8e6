"""What is done (from committed parts), the output lock, and crash recovery at start.

Durable state is only: committed parts, `_runs/` manifests, and replacement markers
(`_overwrite-<id>.json`, `_compact-<id>.json`). A marker names parts that are replaced as a
unit, so a kill at any moment leaves either the old parts or the new ones answering for every
image (see `Replacement`). `recover` runs at every start, under the lock.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .sources import ImageRef
from .writer import PART_PREFIX, TMP_PREFIX, OutputError, fsync_dir, write_json

LOCK_NAME = "_lock"
STAGED_PREFIX = "_staged-"
MARKER_KINDS = ("overwrite", "compact")
# Errors that say something about the file itself: not retried while the file is unchanged.
PERMANENT_ERRORS = frozenset({"empty_file", "corrupt", "unsupported_format", "too_large"})

DoneSet = dict[str, tuple[int | None, int | None]]


class OutputLocked(RuntimeError):
    """Another run holds the output; exit code 3."""


def part_files(output: str) -> list[str]:
    try:
        names = os.listdir(output)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(output, n) for n in names
                  if n.startswith(PART_PREFIX) and n.endswith(".parquet"))


def part_model(path: str) -> str | None:
    """The model a part was written for (file metadata; parts hold one model each)."""
    meta = pq.read_schema(path).metadata or {}
    if b"pipeline.model" in meta:
        return meta[b"pipeline.model"].decode()
    models = pq.read_table(path, columns=["model"]).column("model").unique().to_pylist()
    return models[0] if len(models) == 1 else None


def remove_temp_files(output: str) -> int:
    """Delete temp and staged files left by a killed run (call after `recover`); returns how many."""
    removed = 0
    for directory in (output, os.path.join(output, "_runs")):
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(directory):
                if name.startswith((TMP_PREFIX, STAGED_PREFIX)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))
                        removed += 1
    return removed


def done_keys(output: str, model: str, ignore: frozenset[str] = frozenset()) -> DoneSet:
    """image_id -> (file_size, mtime in us) of the latest row for `model` that needs no redo.

    Reads six small columns of every part (row groups of other models are skipped by their
    statistics); parts named in `ignore` (replaced by an unfinished --overwrite) do not count.
    Memory grows with the number of labeled images (roughly 200 bytes each).
    """
    files = [f for f in part_files(output) if os.path.basename(f) not in ignore]
    if not files:
        return {}
    columns = ["image_id", "model", "file_size", "mtime", "status", "error_kind", "labeled_at"]
    table = ds.dataset(files, format="parquet").to_table(
        columns=columns, filter=ds.field("model") == model)
    latest = table.take(latest_rows(table))
    permanent = pc.is_in(latest.column("error_kind"), value_set=pa.array(sorted(PERMANENT_ERRORS)))
    latest = latest.filter(pc.or_(pc.equal(latest.column("status"), "ok"), permanent))
    done: DoneSet = {}
    for batch in latest.select(["image_id", "file_size", "mtime"]).to_batches(1 << 16):
        ids, sizes, mtimes = (c.to_pylist() for c in (
            batch.column(0), batch.column(1), batch.column(2).cast("int64")))
        done.update(zip(ids, zip(sizes, mtimes)))
    return done


def latest_rows(table: pa.Table) -> pa.Array:
    """Indices of the latest row per (image_id, model): newest labeled_at, on a tie the later row.

    The same rule as the documented DuckDB query (QUALIFY row_number() ... = 1).
    """
    order = pc.sort_indices(table, [("labeled_at", "ascending")])  # stable: ties keep row order
    ranked = table.select(["image_id", "model"]).take(order).append_column(
        "rank", pa.array(np.arange(len(order), dtype=np.int64)))
    last = ranked.group_by(["image_id", "model"], use_threads=False).aggregate([("rank", "max")])
    return order.take(last.column("rank_max"))


def is_done(ref: ImageRef, done: DoneSet) -> bool:
    seen = done.get(ref.image_id)
    if seen is None:
        return False
    mtime_us = None if ref.mtime_ns is None else ref.mtime_ns // 1000
    return seen == (ref.file_size, mtime_us)


# -- replacing a set of parts as a unit: --overwrite and compact ------------------------------

def staged_name(name: str) -> str:
    return f"{STAGED_PREFIX}{name}.staged"


@dataclass
class Replacement:
    """Parts `remove` are replaced by parts `add` (written first as staged, hidden files).

    state "pending": the new parts are still being made. A pending compaction is rolled back
    at the next start; a pending overwrite is continued by the next run of its model (its new
    parts are ordinary parts, committed as the run goes; `remove` does not count as done).
    state "commit": everything new is durable; the next start finishes the swap if a kill
    interrupted it. The swap renames the staged parts in before it deletes the old ones, so a
    reader sees for a moment (or, after a kill in those milliseconds, until the next start)
    identical duplicate rows, never a missing one.
    """

    output: str
    kind: str  # "overwrite" | "compact"
    id: str
    model: str | None
    remove: list[str]
    add: list[str] = field(default_factory=list)
    state: str = "pending"
    started: str = field(default_factory=lambda: _now_iso())

    @property
    def marker(self) -> str:
        return f"_{self.kind}-{self.id}.json"

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "output"}
        write_json(self.output, self.marker, data)

    def commit(self) -> None:
        """Make the new parts the answer: mark committed, swap in, delete the old ones."""
        self.state = "commit"
        self.save()
        self.finish()

    def finish(self) -> None:
        """Swap the staged parts in, then delete the replaced parts and the marker."""
        for name in self.add:
            staged = os.path.join(self.output, staged_name(name))
            if os.path.exists(staged):
                os.replace(staged, os.path.join(self.output, name))
        fsync_dir(self.output)
        missing = [n for n in self.add if not os.path.exists(os.path.join(self.output, n))]
        if missing:  # only if someone deleted files by hand: then keep the old parts
            raise OutputError(f"{self.marker}: new parts are missing ({', '.join(missing)}); "
                              "the parts it replaces are kept")
        self._unlink(self.remove)
        self._unlink([self.marker])

    def abandon(self) -> None:
        """Forget a pending replacement: delete its staged parts and the marker."""
        self._unlink([staged_name(n) for n in self.add] + [self.marker])

    def _unlink(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.output, name))
        fsync_dir(self.output)


def replacements(output: str) -> list[Replacement]:
    """Every marker in OUTPUT, oldest first."""
    found = []
    for name in sorted(os.listdir(output)):
        kind = name[1:].split("-", 1)[0]
        if name.startswith("_") and kind in MARKER_KINDS and name.endswith(".json"):
            with open(os.path.join(output, name), encoding="utf-8") as f:
                found.append(Replacement(output=output, **json.load(f)))
    return sorted(found, key=lambda r: r.started)


def recover(output: str) -> list[str]:
    """Finish or roll back what a killed run left (under the lock); returns what was done."""
    notes = []
    for rep in replacements(output):
        if rep.state == "commit":
            rep.finish()
            notes.append(f"finished the interrupted {rep.kind} {rep.id}")
        elif rep.kind == "compact":
            rep.abandon()
            notes.append(f"rolled back the interrupted compaction {rep.id}")
    removed = remove_temp_files(output)
    if removed:
        notes.append(f"removed {removed} temp file(s) of an interrupted run")
    return notes


def unfinished_overwrite(output: str, model: str) -> Replacement | None:
    return next((r for r in replacements(output)
                 if r.kind == "overwrite" and r.model == model and r.state == "pending"), None)


def start_overwrite(output: str, model: str, run_id: str) -> Replacement:
    """Record the parts of `model` that this run replaces; they stay readable until it completes."""
    old = [os.path.basename(p) for p in part_files(output) if part_model(p) == model]
    rep = Replacement(output, "overwrite", run_id, model, old)
    rep.save()
    return rep


# -- the lock ----------------------------------------------------------------------------------

@contextlib.contextmanager
def lock(output: str, command: str = "label") -> Iterator[None]:
    """Hold an exclusive flock on OUTPUT/_lock; the kernel releases it if we are killed."""
    path = os.path.join(output, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(_holder_message(path)) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now_iso(),
                  "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder_message(path: str) -> str:
    who = "another process"
    for _ in range(20):  # the holder writes its JSON right after taking the lock
        try:
            with open(path, encoding="utf-8") as f:
                h = json.load(f)
            who = f"pid {h['pid']} on host {h['host']}, started {h['started']}"
            break
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    return f"output is locked by {who}; wait for it to finish (lock file {path})"


def check_writable(output: str) -> None:
    """Fail early (OutputError, exit 4) if OUTPUT cannot take new files."""
    probe = os.path.join(output, f"{TMP_PREFIX}probe-{os.getpid()}")
    try:
        with open(probe, "wb"):
            pass
        with contextlib.suppress(FileNotFoundError):  # the lock holder's start-up cleanup
            os.unlink(probe)
    except OSError as e:
        raise OutputError(f"output directory {output} is not writable: {e.strerror or e}") from e


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
