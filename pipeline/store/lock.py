"""The OUTPUT lock: an flock locally, a lease object on S3, and the fencing that keeps a run
that lost its lease from committing anything more."""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Callable, Iterator

from .. import interrupts
from ..exitcodes import LockedError
from . import layout
from .base import Lease, OutputError, Store

log = logging.getLogger(__name__)


class OutputLocked(LockedError, RuntimeError):
    """Another run holds the output; exit code 3."""


class LeaseLost(LockedError, RuntimeError):
    """Another run took this run's S3 lease over: nothing more may be committed; exit code 3."""

    hint = "run the same command again once that run has finished, to label what is left"


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _holder(command: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _now_iso(),
            "command": command}


# -- locally: flock ----------------------------------------------------------------------------

@contextlib.contextmanager
def flock_directory(output: str, command: str) -> Iterator[Lease]:
    """Hold an exclusive flock on the OUTPUT (or bundle) directory itself; the kernel releases
    it if we are killed. A file could be deleted under a live run and let a second run in; the directory
    cannot (a new directory of the same name is another inode, with its own parts).

    `OUTPUT/_lock` holds who has it (pid, host, started) for the message, and is flocked too, so
    a run of an older version (which locked only that file) is kept out as well."""
    holder_path = os.path.join(output, layout.LOCK)
    with contextlib.ExitStack() as held:
        _lock_directory(held.enter_context(_open_fd(output, os.O_RDONLY | os.O_DIRECTORY)),
                        output, holder_path)
        fd = held.enter_context(_open_fd(holder_path, os.O_RDWR | os.O_CREAT, 0o644))
        _flock_or_locked(fd, holder_path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(command)).encode(), 0)
        yield Lease()


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


# -- on S3: a lease object, renewed by conditional writes --------------------------------------

class S3Lease(Lease):
    """OUTPUT/_lock, ours while its ETag is the one our last write got. Every renewal is a
    PUT with If-Match on that ETag, so it fails once another run has taken the lock over: that
    is the fencing token. `confirm` renews before each commit; a heartbeat renews every
    lease/10 s in between, so the lease never runs out while we are alive and reachable."""

    def __init__(self, store: Store, holder: dict, token: str, lease: float):
        self._store, self._holder, self._token, self.lease = store, holder, token, lease
        self._renewals = 0
        self._mutex = threading.Lock()  # the heartbeat and a commit renew one at a time
        self.lost = False

    @property
    def uri(self) -> str:
        return self._store.uri(layout.LOCK)

    def confirm(self) -> None:
        with self._mutex:
            if not self.lost:
                self._renew()
            if self.lost:
                raise LeaseLost(f"lost the output lock {self.uri}: another run took it over "
                                f"after it went {self.lease:g} s without a refresh (was this "
                                "process paused, or cut off from S3?); this run commits "
                                "nothing more")

    def beat(self) -> None:
        """A heartbeat's renewal: S3 unreachable is not fatal here (a commit would fail on its
        own), a lock taken over is noted and logged."""
        with self._mutex:
            if self.lost:
                return
            try:
                self._renew()
            except OutputError:
                return
            if self.lost:
                log.warning(f"lost the lock {self.uri} (another run took it over after the "
                            "lease ran out); nothing more is committed")

    def _renew(self) -> None:
        self._renewals += 1
        body = json.dumps({**self._holder, "refreshed": _now_iso(),
                           "renewal": self._renewals}).encode()
        try:
            token = self._store.replace_bytes(layout.LOCK, body, self._token)
        except OSError as e:
            raise OutputError(f"cannot renew the lock {self.uri}: {e}") from e
        if token is None:
            self.lost = True
        else:
            self._token = token

    def release(self) -> None:
        """Delete the lock if it is still ours (renewed just before, so nobody took it)."""
        with self._mutex:
            if self.lost:
                return
            try:
                self._renew()
                if not self.lost:
                    self._store.delete([layout.LOCK], fenced=False)
            except OSError as e:  # unreachable now: the next run on this host takes it at once
                log.warning(f"could not release the lock {self.uri}: {e}")


@contextlib.contextmanager
def s3_lease(store: Store, command: str, lease: float,
             clock: Callable[[], float] | None = None) -> Iterator[S3Lease]:
    """OUTPUT/_lock created with a conditional write (If-None-Match: *). A lock not renewed for
    `lease` seconds of `clock` (time.time), or held by a dead pid on this host, is stale and
    taken over with If-Match on its ETag (so two takers cannot both win)."""
    holder = {**_holder(command), "lease_seconds": lease, "nonce": secrets.token_hex(4)}
    held = S3Lease(store, holder, _take(store, holder, lease, clock or time.time), lease)
    heartbeat = _Heartbeat(held, lease / 10)
    heartbeat.start()
    released = threading.Lock()

    def release() -> None:  # by the main thread, or by the signal watchdog if that is stuck
        if released.acquire(blocking=False):
            heartbeat.stop()
            held.release()

    try:
        with interrupts.rescue_with(release):
            yield held
    finally:
        release()


def _take(store: Store, holder: dict, lease: float, clock: Callable[[], float]) -> str:
    uri, body = store.uri(layout.LOCK), json.dumps(holder).encode()
    for _ in range(3):  # the lock may vanish between our create and our read
        try:
            token = store.create_bytes(layout.LOCK, body)
        except OSError as e:
            raise OutputError(f"cannot create the lock {uri}: {e}") from e
        if token is not None:
            return token
        current = store.read_versioned(layout.LOCK)
        if current is None:
            continue
        data, etag, modified = current
        other = _parse_holder(data)
        if not _is_stale(other, modified, lease, clock):
            raise OutputLocked(f"output is locked by {_describe_holder(other)}; wait for it to "
                               f"finish (lock object {uri}, stale after {lease:.0f} s without refresh)")
        try:
            token = store.replace_bytes(layout.LOCK, body, etag)
        except OSError as e:
            raise OutputError(f"cannot take over the stale lock {uri}: {e}") from e
        if token is not None:
            log.info(f"took over the stale lock {uri} of {_describe_holder(other)}")
            return token
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


def _is_stale(holder: dict, modified: float, lease: float, clock: Callable[[], float]) -> bool:
    """Not refreshed within the lease, or its process is gone (only knowable on this host)."""
    if clock() - modified > lease:
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
    """Renews the lease every `interval` s until stopped or lost."""

    def __init__(self, lease: S3Lease, interval: float):
        super().__init__(name="s3-lock-heartbeat", daemon=True)
        self._lease, self._interval = lease, interval
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self._interval) and not self._lease.lost:
            self._lease.beat()

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)
