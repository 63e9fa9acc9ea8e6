"""The output store's interface: what every OUTPUT (a local directory or an s3:// prefix)
offers. Names are relative to OUTPUT (see layout.py); no caller builds a path or a key.

Writes are atomic: a reader sees the old file or the new one, never half of one (locally a
temp file, fsync and rename; on S3 one PUT, or a multipart upload, which S3 shows only when
complete). While `lock` is held, every write except those passed `fenced=False` first checks
that the lock is still ours (`fence`): a run that lost its S3 lease commits nothing more.
"""
from __future__ import annotations

import abc
import contextlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator, Sequence

from ..exitcodes import FatalError
from . import layout

READ_CHUNK = 8 << 20  # bytes per read of a file streamed through (open_local)

if TYPE_CHECKING:
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs


class OutputError(FatalError, OSError):
    """OUTPUT cannot take a file (full disk, read-only, no permission); exit code 4."""

    hint = "committed parts are kept, fix it and run the same command again"


class Lease:
    """A held OUTPUT lock (see lock.py). An flock cannot be lost while the process lives, so
    confirming it is free; an S3 lease overrides `confirm`."""

    lost = False

    def confirm(self) -> None:
        """LeaseLost if another run holds the output now."""


@dataclass(frozen=True)
class StoredFile:
    name: str  # relative to OUTPUT
    size: int


class Store(abc.ABC):
    """One OUTPUT. Get one with `store.open_output(output, s3)`."""

    leftover_directories: tuple[str, ...] = ("", layout.RUNS, layout.INDEX)  # where temps can be

    def __init__(self, output: str):
        self.output = output  # as the user gave it (messages name it)
        self._lease: Lease | None = None

    # -- where things are ----------------------------------------------------------------------

    @abc.abstractmethod
    def uri(self, name: str = "") -> str:
        """The local path or s3:// URI of `name` (for messages, and for the rows' readers)."""

    @abc.abstractmethod
    def files(self, directory: str = "") -> list[StoredFile]:
        """The files directly in OUTPUT (or its `directory`), sorted by name; [] if absent."""

    def names(self, directory: str = "") -> list[str]:
        return [f.name.rsplit("/", 1)[-1] for f in self.files(directory)]

    def data_files(self, ignore: frozenset[str] = frozenset()) -> list[StoredFile]:
        """The data files readers see, in commit order (names sort by run start, then seq);
        `ignore`: names left out (the parts an unfinished --overwrite replaces)."""
        return [f for f in self.files() if layout.is_data_file(f.name) and f.name not in ignore]

    def is_output(self) -> bool:
        """Whether OUTPUT holds anything `label` writes: a data file, the lock, a replacement
        marker, a run manifest (commands that rewrite OUTPUT refuse anything else)."""
        return any(layout.is_data_file(n) or n == layout.LOCK or layout.marker_kind(n)
                   for n in self.names()) or bool(self.names(layout.RUNS))

    def exists(self, name: str) -> bool:
        return name.rsplit("/", 1)[-1] in self.names(name.rpartition("/")[0])

    # -- reading -------------------------------------------------------------------------------

    @abc.abstractmethod
    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        """The file's bytes (at most `limit`); FileNotFoundError if there is none."""

    def read_json(self, name: str, limit: int | None = None):
        return json.loads(self.read_bytes(name, limit).decode("utf-8"))

    @abc.abstractmethod
    def open_local(self, name: str, each: Callable[[bytes], object]) -> BinaryIO:
        """`name`'s bytes as a local file object numpy can memory-map (it has a fileno),
        positioned at the start, after one pass over the bytes that hands every chunk to `each`
        (a checksum). Locally the file itself; on S3 a private temporary file in TMPDIR
        (unnamed: gone once closed and unmapped, however the process ends) filled by one
        streamed GET. The caller closes it; a memory map of it outlives the close.
        FileNotFoundError if there is no such file."""

    @abc.abstractmethod
    def arrow(self, names: Sequence[str]) -> tuple[list[str], "pafs.FileSystem"]:
        """(paths, filesystem) for pyarrow: pq.ParquetFile(paths[i], filesystem=filesystem),
        ds.dataset(paths, filesystem=filesystem)."""

    def dataset(self, names: Sequence[str], schema=None) -> "ds.Dataset":
        """The Parquet files `names` as one pyarrow dataset (a scan streams them)."""
        import pyarrow.dataset as ds

        paths, filesystem = self.arrow(names)
        return ds.dataset(paths, schema=schema, format="parquet", filesystem=filesystem)

    # -- writing -------------------------------------------------------------------------------

    def write_bytes(self, name: str, data: bytes, fenced: bool = True) -> None:
        """A small file, replaced atomically and durably."""
        self.write_file(name, lambda f: f.write(data), fenced)

    def write_json(self, name: str, obj, fenced: bool = True) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2, default=str).encode(), fenced)

    def write_file(self, name: str, write: Callable[[BinaryIO], object],
                   fenced: bool = True) -> None:
        """`write(f)` writes the file's content to a binary file object (any size); it becomes
        `name` atomically. OutputError if it cannot be written. Fenced at the moment it
        becomes visible (the rename, the PUT, the multipart upload's completion)."""
        with self.writing(name, fenced) as path:
            with open(path, "wb") as f:
                write(f)

    @abc.abstractmethod
    def writing(self, name: str, fenced: bool = True) -> contextlib.AbstractContextManager[str]:
        """A local path to write `name`'s content to (for writers that want a file name, e.g.
        DuckDB's COPY ... TO); when the block ends cleanly the file becomes `name` atomically
        (on S3 it is uploaded, then deleted), else it is removed."""

    @abc.abstractmethod
    def create_bytes(self, name: str, data: bytes) -> str | None:
        """Create `name` only if it does not exist: its version token, or None if it exists."""

    @abc.abstractmethod
    def replace_bytes(self, name: str, data: bytes, token: str) -> str | None:
        """Replace `name` only if it is still at version `token`: the new token, or None if it
        changed or is gone. (Locally the OUTPUT lock already keeps writers apart.)"""

    @abc.abstractmethod
    def read_versioned(self, name: str) -> tuple[bytes, str, float] | None:
        """(bytes, version token, modified epoch seconds), or None if there is no such file."""

    def delete(self, names: Sequence[str], fenced: bool = True) -> None:
        """Delete files (one that is already gone is no error), durably."""
        if fenced:
            self.fence()
        self._delete(list(names))

    @abc.abstractmethod
    def _delete(self, names: list[str]) -> None: ...

    def publish(self, moves: Sequence[tuple[str, str]], fenced: bool = True) -> None:
        """Give staged files their final names: (staged, final) pairs. Locally a rename; on S3
        a server-side copy, then the staged object is deleted (S3 has no rename)."""
        if fenced:
            self.fence()
        self._publish(list(moves))

    @abc.abstractmethod
    def _publish(self, moves: list[tuple[str, str]]) -> None: ...

    # -- a run's start -------------------------------------------------------------------------

    @abc.abstractmethod
    def prepare(self) -> None:
        """Before a run: create OUTPUT (locally) and fail early (ConfigError, OutputError) if
        it cannot take files."""

    @abc.abstractmethod
    def require_existing(self) -> None:
        """ConfigError if OUTPUT does not exist (commands that only read or rewrite it)."""

    def remove_leftovers(self) -> int:
        """Delete temp and staged files a killed run left (under the lock, after the markers
        are dealt with); returns how many."""
        leftovers = [layout.join(d, n) for d in self.leftover_directories for n in self.names(d)
                     if layout.is_leftover(n)]
        if leftovers:
            self.delete(leftovers)
        return len(leftovers)

    # -- the lock ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, command: str = "label", lease: float = 600.0,
             clock: Callable[[], float] | None = None) -> Iterator[Lease]:
        """Hold OUTPUT exclusively (OutputLocked, exit 3, if another run has it). Locally an
        flock the kernel drops when we die; on S3 a lease object kept by a heartbeat, taken
        over when not refreshed for `lease` seconds of `clock` (time.time)."""
        with self._lock(command, lease, clock) as held:
            self._lease = held
            try:
                yield held
            finally:
                self._lease = None

    @abc.abstractmethod
    def _lock(self, command: str, lease: float, clock) -> contextlib.AbstractContextManager: ...

    def fence(self) -> None:
        """LeaseLost (exit 3) if this store's lock was taken over by another run; on S3 this
        renews the lease with a conditional write, so nobody can have taken it before."""
        if self._lease is not None:
            self._lease.confirm()
