"""A labeling OUTPUT's state: what is done (from committed parts), the output lock, and crash
recovery at start. (Fine-tuning's epoch checkpoints are finetune/training_checkpoints.py.)
Every function given an OUTPUT takes `s3`, how to reach it when it is an s3:// URI.

Durable state is only: committed parts, `_runs/` manifests, and replacement markers
(`_overwrite-<id>.json`, `_compact-<id>.json`). A marker names parts that are replaced as a
unit, so a kill at any moment leaves either the old parts or the new ones answering for every
image (see `Replacement`). `recover` runs at every start, under the lock.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import doneset, interrupts, storage
from .atomic import TMP_PREFIX
from .doneset import DoneSet, Identity
from .exitcodes import LockedError
from .types import S3Options
from .writer import (EMBEDDING, EMBEDDING_TYPE, PART_PREFIX, SCHEMA, OutputError, fsync_dir,
                     write_json)

log = logging.getLogger(__name__)

LOCK_NAME = "_lock"
STAGED_PREFIX = "_staged-"
MARKER_KINDS = ("overwrite", "compact")
PERMANENT_ERRORS = doneset.PERMANENT_ERRORS


class OutputLocked(LockedError, RuntimeError):
    """Another run holds the output; exit code 3."""


def part_files(output: str, s3: S3Options = S3Options()) -> list[str]:
    return sorted(storage.join(output, n) for n in storage.names_in(output, s3)
                  if n.startswith(PART_PREFIX) and n.endswith(".parquet"))


class CorruptPart(OutputError):
    """A `part-*.parquet` in OUTPUT that is not a readable part of ours (exit code 4)."""

    hint = ""  # the message itself says what to do with the file


# Columns added to writer.SCHEMA after parts were first written: a part without them is
# still ours (a reader fills them with nulls).
OPTIONAL_COLUMNS: frozenset[str] = frozenset({"content_sha256"})
# Columns a part may have beyond writer.SCHEMA: with --embeddings, the pooled features
# (readers that need them check for them).
EXTRA_COLUMNS: frozenset[str] = frozenset({EMBEDDING})


def check_part(path: str, s3: S3Options = S3Options()) -> pq.ParquetFile:
    """Open a part's footer and check its schema against the writer's; CorruptPart names the
    file and what to do. Cheap: reads the footer only. Call it before reading any part."""
    (where,), filesystem = _arrow_location([path], s3)
    try:
        part = pq.ParquetFile(where, filesystem=filesystem)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _corrupt(path, f"not a readable Parquet file ({_first_line(e)})") from None
    problem = _schema_problem(part.schema_arrow)
    if problem:
        part.close()
        raise _corrupt(path, f"not written by pipeline: {problem}")
    return part


def _schema_problem(schema: pa.Schema) -> str | None:
    found = {f.name: f.type for f in schema}
    missing = [f.name for f in SCHEMA if f.name not in found and f.name not in OPTIONAL_COLUMNS]
    unexpected = sorted(set(found) - set(SCHEMA.names) - EXTRA_COLUMNS)
    wrong = [f"{f.name} is {found[f.name]}, not {f.type}" for f in SCHEMA
             if f.name in found and found[f.name] != f.type]
    embedding = found.get(EMBEDDING)
    if embedding is not None and not (pa.types.is_fixed_size_list(embedding)
                                      and embedding.value_type == EMBEDDING_TYPE):
        wrong.append(f"{EMBEDDING} is {embedding}, not a fixed-size list of {EMBEDDING_TYPE}")
    problems = ([f"missing column(s) {_some(missing)}"] if missing else []) + (
        [f"unexpected column(s) {_some(unexpected)}"] if unexpected else []) + wrong
    return "; ".join(problems) or None


def _some(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _corrupt(path: str, reason: str) -> CorruptPart:
    return CorruptPart(f"{path} is {reason}. Every part-*.parquet in OUTPUT must be one this "
                       "tool wrote: move that file out of OUTPUT (or delete it if it is a stray "
                       "copy) and run the command again")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextlib.contextmanager
def reading_part(path: str) -> Iterator[None]:
    """Turn a read error inside a part that passed check_part (damaged pages) into CorruptPart."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, OutputError):
            raise
        raise _corrupt(path, f"damaged ({_first_line(e)})") from None


def _arrow_location(paths: list[str], s3: S3Options) -> tuple[list[str], object]:
    """(paths, filesystem) as pyarrow wants them: s3:// URIs become bucket/key on our S3 fs."""
    if paths and storage.is_s3(paths[0]):
        return [storage.fs_path(p) for p in paths], storage.filesystem(s3)
    return paths, None


def part_model(path: str, s3: S3Options = S3Options()) -> str | None:
    """The model a part was written for (file metadata; parts hold one model each)."""
    with contextlib.closing(check_part(path, s3)) as part, reading_part(path):
        meta = part.schema_arrow.metadata or {}
        if b"pipeline.model" in meta:
            return meta[b"pipeline.model"].decode()
        models = part.read(columns=["model"]).column("model").unique().to_pylist()
    return models[0] if len(models) == 1 else None


def remove_temp_files(output: str) -> int:
    """Delete temp and staged files left by a killed run (call after `recover`); returns how many."""
    removed = 0
    if storage.is_s3(output):  # S3 objects are written whole under their final key: no temps
        return 0
    for directory in (output, os.path.join(output, "_runs")):
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(directory):
                if name.startswith((TMP_PREFIX, STAGED_PREFIX)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))
                        removed += 1
    return removed


def done_set(output: str, identity: Identity, ignore: frozenset[str] = frozenset(),
             s3: S3Options = S3Options()) -> DoneSet:
    """What a run of `identity` skips, and which refs failed the same way before: see
    doneset.DoneSet.check.

    Streams over the parts in bounded record batches; parts named in `ignore` (replaced by an
    unfinished --overwrite) do not count. Memory: 25 bytes plus the image_id's length per
    image whose latest row is done or a retried error."""
    files = [f for f in part_files(output, s3) if os.path.basename(f) not in ignore]
    return doneset.build(files, identity, functools.partial(_checked_part, s3=s3))


@contextlib.contextmanager
def _checked_part(path: str, s3: S3Options) -> Iterator[pq.ParquetFile]:
    with contextlib.closing(check_part(path, s3)) as part, reading_part(path):
        yield part


def latest_rows(table: pa.Table) -> pa.Array:
    """Indices of the latest row per (image_id, model): newest labeled_at, on a tie the later row.

    The same rule as the documented DuckDB query (QUALIFY row_number() ... = 1).
    """
    order = pc.sort_indices(table, [("labeled_at", "ascending")])  # stable: ties keep row order
    ranked = table.select(["image_id", "model"]).take(order).append_column(
        "rank", pa.array(np.arange(len(order), dtype=np.int64)))
    last = ranked.group_by(["image_id", "model"], use_threads=False).aggregate([("rank", "max")])
    return order.take(last.column("rank_max"))


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
    s3: S3Options = field(default_factory=S3Options)  # how to reach an s3:// output
    etag: str | None = None  # on S3: the marker's version this run wrote (conditional writes)

    @property
    def marker(self) -> str:
        return f"_{self.kind}-{self.id}.json"

    def save(self) -> None:
        """Locally an atomic write. On S3 a conditional one: created only if absent, replaced
        only if it is still the version we wrote, so a run that took the lock over (after our
        lease ran out) and rolled this marker back makes our commit fail instead of landing."""
        data = {k: v for k, v in asdict(self).items() if k not in ("output", "s3", "etag")}
        if not storage.is_s3(self.output):
            write_json(self.output, self.marker, data, self.s3)
            return
        uri = storage.join(self.output, self.marker)
        body = json.dumps(data, indent=2, default=str).encode()
        condition = {"IfMatch": self.etag} if self.etag else {"IfNoneMatch": "*"}
        try:
            self.etag = storage.put_bytes(uri, body, self.s3, **condition)
        except storage.S3Error as e:
            if e.code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                raise OutputError(f"{uri} was changed by another run (it took the lock over "
                                  "after this one's lease ran out); nothing was committed") from e
            raise OutputError(str(e)) from e

    def commit(self) -> None:
        """Make the new parts the answer: mark committed, swap in, delete the old ones."""
        self.state = "commit"
        self.save()
        self.finish()

    def finish(self) -> None:
        """Swap the staged parts in (locally a rename, on S3 a server-side copy), then delete
        the replaced parts and the marker."""
        for name in self.add:
            staged = storage.join(self.output, staged_name(name))
            if storage.is_s3(self.output):
                if storage.exists(staged, self.s3):
                    storage.copy(staged, storage.join(self.output, name), self.s3)
                    storage.delete(staged, self.s3)
            elif os.path.exists(staged):
                os.replace(staged, os.path.join(self.output, name))
        fsync_dir(self.output)
        missing = [n for n in self.add if not storage.exists(storage.join(self.output, n), self.s3)]
        if missing:  # only if someone deleted files by hand: then keep the old parts
            raise OutputError(f"{self.marker}: new parts are missing ({', '.join(missing)}); "
                              "the parts it replaces are kept")
        self._unlink(self.remove)
        self._unlink([self.marker])

    def abandon(self) -> None:
        """Forget a pending replacement: delete its staged parts (also those not yet named in
        the marker: a compaction names its files when they are all written) and the marker."""
        mine = f"{STAGED_PREFIX}{PART_PREFIX}{self.id}-"
        staged = {staged_name(n) for n in self.add} | {
            n for n in storage.names_in(self.output, self.s3) if n.startswith(mine)}
        self._unlink(sorted(staged) + [self.marker])

    def _unlink(self, names: list[str]) -> None:
        for name in names:
            if storage.is_s3(self.output):
                storage.delete(storage.join(self.output, name), self.s3)  # missing: no error
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.output, name))
        fsync_dir(self.output)


def replacements(output: str, s3: S3Options = S3Options()) -> list[Replacement]:
    """Every marker in OUTPUT, oldest first."""
    found = []
    for name in sorted(storage.names_in(output, s3)):
        kind = name[1:].split("-", 1)[0]
        if name.startswith("_") and kind in MARKER_KINDS and name.endswith(".json"):
            found.append(Replacement(output=output, s3=s3,
                                     **json.loads(_read_text(output, name, s3))))
    return sorted(found, key=lambda r: r.started)


def recover(output: str, s3: S3Options = S3Options()) -> list[str]:
    """Finish or roll back what a killed run left (under the lock); returns what was done."""
    notes = []
    for rep in replacements(output, s3):
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


def _read_text(output: str, name: str, s3: S3Options) -> str:
    if storage.is_s3(output):
        return storage.read_bytes(storage.join(output, name), s3).decode("utf-8")
    with open(os.path.join(output, name), encoding="utf-8") as f:
        return f.read()


def unfinished_overwrite(output: str, model: str, s3: S3Options = S3Options()) -> Replacement | None:
    return next((r for r in replacements(output, s3)
                 if r.kind == "overwrite" and r.model == model and r.state == "pending"), None)


def start_overwrite(output: str, model: str, run_id: str, s3: S3Options = S3Options()) -> Replacement:
    """Record the parts of `model` that this run replaces; they stay readable until it completes."""
    old = [os.path.basename(p) for p in part_files(output, s3) if part_model(p, s3) == model]
    rep = Replacement(output, "overwrite", run_id, model, old, s3=s3)
    rep.save()
    return rep


# -- the lock ----------------------------------------------------------------------------------

@contextlib.contextmanager
def lock(output: str, command: str = "label", lease: float = 600.0,
         s3: S3Options = S3Options()) -> Iterator[None]:
    """Hold an exclusive flock on the OUTPUT directory itself; the kernel releases it if we are
    killed. A file could be deleted under a live run and let a second run in; the directory
    cannot (a new directory of the same name is another inode, with its own parts).

    `OUTPUT/_lock` holds who has it (pid, host, started) for the message, and is flocked too, so
    a run of an older version (which locked only that file) is kept out as well.
    On S3: a lock object with a lease (see `_s3_lock`)."""
    if storage.is_s3(output):
        with _s3_lock(output, command, lease, s3):
            yield
        return
    with contextlib.ExitStack() as held:
        holder_path = os.path.join(output, LOCK_NAME)
        _lock_directory(held.enter_context(_open_fd(output, os.O_RDONLY | os.O_DIRECTORY)),
                        output, holder_path)
        fd = held.enter_context(_open_fd(holder_path, os.O_RDWR | os.O_CREAT, 0o644))
        _flock_or_locked(fd, holder_path)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now_iso(),
                  "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield


@contextlib.contextmanager
def _open_fd(path: str, flags: int, mode: int = 0o777) -> Iterator[int]:
    fd = os.open(path, flags, mode)
    try:
        yield fd
    finally:
        os.close(fd)


def _lock_directory(fd: int, output: str, holder_path: str) -> None:
    """NFS emulates flock with byte-range locks, which refuse a read-only descriptor: there the
    holder file's lock is all we get."""
    try:
        _flock_or_locked(fd, holder_path)
    except OSError as e:
        if e.errno not in (errno.EBADF, errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        log.warning(f"cannot lock the directory {output} on this filesystem ({e.strerror}); "
                    f"locking {holder_path} only: do not delete it while a run is going")


def _flock_or_locked(fd: int, holder_path: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputLocked(_holder_message(holder_path)) from None


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
    return f"output is locked by {who}; wait for it to finish"


@contextlib.contextmanager
def _s3_lock(output: str, command: str, lease: float, s3: S3Options) -> Iterator[None]:
    """OUTPUT/_lock created with a conditional write (If-None-Match: *), refreshed every lease/10
    by a thread. A lock not refreshed for `lease` seconds, or held by a dead pid on this host, is
    stale and taken over with If-Match on its ETag (so two takers cannot both win)."""
    uri = storage.join(output, LOCK_NAME)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now_iso(),
              "command": command, "lease_seconds": lease}
    heartbeat = _Heartbeat(uri, holder, _take_s3_lock(uri, holder, lease, s3), lease / 10, s3)
    heartbeat.start()
    released = threading.Lock()

    def release() -> None:  # by the main thread, or by the signal watchdog if that is stuck
        if not released.acquire(blocking=False):
            return
        heartbeat.stop()
        try:
            if heartbeat.held:
                storage.delete(uri, s3)
        except OSError as e:  # unreachable now: the next run on this host takes it over at once
            log.warning(f"could not release the lock {uri}: {e}")

    try:
        with interrupts.rescue_with(release):
            yield
    finally:
        release()


def _take_s3_lock(uri: str, holder: dict, lease: float, s3: S3Options) -> str:
    body = json.dumps(holder).encode()
    for _ in range(3):  # the lock may vanish between our create and our read
        try:
            return storage.put_bytes(uri, body, s3, IfNoneMatch="*")
        except storage.S3Error as e:
            if e.code not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise OutputError(f"cannot create the lock {uri}: {e}") from e
        current = storage.get_object(uri, s3)
        if current is None:
            continue
        data, etag, modified = current
        other = _parse_holder(data)
        if not _is_stale(other, modified, lease):
            raise OutputLocked(f"output is locked by {_describe_holder(other)}; wait for it to "
                               f"finish (lock object {uri}, stale after {lease:.0f} s without refresh)")
        try:
            return storage.put_bytes(uri, body, s3, IfMatch=etag)
        except storage.S3Error as e:
            if e.code not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise OutputError(f"cannot take over the stale lock {uri}: {e}") from e
    raise OutputLocked(f"output is locked by another run that just took the lock {uri}")


def _parse_holder(data: bytes) -> dict:
    try:
        return dict(json.loads(data))
    except (ValueError, TypeError):
        return {}


def _describe_holder(h: dict) -> str:
    if not h:
        return "another process"
    return f"pid {h.get('pid')} on host {h.get('host')}, started {h.get('started')}"


def _is_stale(holder: dict, modified: float, lease: float) -> bool:
    """Not refreshed within the lease, or its process is gone (only knowable on this host)."""
    if time.time() - modified > lease:
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


class _Heartbeat(threading.Thread):
    """Rewrites the lock object every `interval` s (If-Match: our last ETag) to keep the lease."""

    def __init__(self, uri: str, holder: dict, etag: str, interval: float, s3: S3Options):
        super().__init__(name="s3-lock-heartbeat", daemon=True)
        self._s3 = s3
        self._uri, self._holder, self._etag, self._interval = uri, holder, etag, interval
        self._stopping = threading.Event()
        self.held = True

    def run(self) -> None:
        while not self._stopping.wait(self._interval):
            body = json.dumps({**self._holder, "refreshed": _now_iso()}).encode()
            try:
                self._etag = storage.put_bytes(self._uri, body, self._s3, IfMatch=self._etag)
            except storage.S3Error as e:
                if e.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    self.held = False
                    log.warning(f"lost the lock {self._uri} (another run took it over after "
                                "the lease ran out)")
                    return
                # unreachable: keep trying; parts written meanwhile fail on their own

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)


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
