"""An OUTPUT on a local (or mounted) filesystem."""
from __future__ import annotations

import contextlib
import os
from typing import BinaryIO, Callable, Iterator, Sequence

from .. import atomic
from ..exitcodes import ConfigError
from . import layout, lock
from .base import READ_CHUNK, OutputError, Store, StoredFile


class LocalStore(Store):

    def uri(self, name: str = "") -> str:
        return os.path.join(self.output, *name.split("/")) if name else self.output

    def files(self, directory: str = "") -> list[StoredFile]:
        found = []
        try:
            with os.scandir(self.uri(directory)) as entries:
                for entry in entries:
                    with contextlib.suppress(FileNotFoundError):  # deleted while we list
                        if entry.is_file():
                            found.append(StoredFile(layout.join(directory, entry.name),
                                                    entry.stat().st_size))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(found, key=lambda f: f.name)

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        with open(self.uri(name), "rb") as f:
            return f.read() if limit is None else f.read(limit)

    def open_local(self, name: str, each: Callable[[bytes], object]) -> BinaryIO:
        f = open(self.uri(name), "rb")
        try:
            while chunk := f.read(READ_CHUNK):
                each(chunk)
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f

    def arrow(self, names: Sequence[str]):
        from pyarrow import fs

        return [os.path.abspath(self.uri(n)) for n in names], fs.LocalFileSystem()

    @contextlib.contextmanager
    def writing(self, name: str, fenced: bool = True) -> Iterator[str]:
        final = self.uri(name)
        try:
            if "/" in name:
                os.makedirs(os.path.dirname(final), exist_ok=True)
            with atomic.replacing(final) as tmp:
                yield tmp
                if fenced:
                    self.fence()
        except OSError as e:
            if isinstance(e, OutputError):
                raise
            raise OutputError(f"cannot write {final}: {e.strerror or e}") from e

    def create_bytes(self, name: str, data: bytes) -> str | None:
        final = self.uri(name)
        tmp = atomic.temp_path(final)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, final)  # fails if `final` exists: the atomic create
        except FileExistsError:
            return None
        except OSError as e:
            raise OutputError(f"cannot write {final}: {e.strerror or e}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        atomic.fsync_dir(os.path.dirname(final) or ".")
        return _token(final)

    def replace_bytes(self, name: str, data: bytes, token: str) -> str | None:
        final = self.uri(name)
        try:
            if _token(final) != token:
                return None
        except FileNotFoundError:
            return None
        atomic.write_bytes(final, data)
        return _token(final)

    def read_versioned(self, name: str) -> tuple[bytes, str, float] | None:
        try:
            with open(self.uri(name), "rb") as f:
                st = os.fstat(f.fileno())
                return f.read(), _token_of(st), st.st_mtime
        except FileNotFoundError:
            return None

    def _delete(self, names: list[str]) -> None:
        directories = set()
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uri(name))
            directories.add(os.path.dirname(self.uri(name)) or ".")
        for d in directories:
            atomic.fsync_dir(d)

    def _publish(self, moves: list[tuple[str, str]]) -> None:
        for staged, final in moves:
            os.replace(self.uri(staged), self.uri(final))
        if moves:
            atomic.fsync_dir(self.output)

    def prepare(self) -> None:
        if os.path.exists(self.output) and not os.path.isdir(self.output):
            raise ConfigError(f"output {self.output} exists and is not a directory")
        try:
            os.makedirs(self.uri(layout.RUNS), exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create output directory {self.output}: "
                              f"{e.strerror or e}") from e
        self.check_writable()

    def check_writable(self) -> None:
        """Fail early (OutputError, exit 4) if OUTPUT cannot take new files."""
        probe = os.path.join(self.output, f"{atomic.TMP_PREFIX}probe-{os.getpid()}")
        try:
            with open(probe, "wb"):
                pass
            with contextlib.suppress(FileNotFoundError):  # the lock holder's start-up cleanup
                os.unlink(probe)
        except OSError as e:
            raise OutputError(f"output directory {self.output} is not writable: "
                              f"{e.strerror or e}") from e

    def require_existing(self) -> None:
        if not os.path.isdir(self.output):
            raise ConfigError(f"OUTPUT not found: {self.output} is not a directory")

    def _lock(self, command: str, lease: float, clock):
        return lock.flock_directory(self.output, command)


def _token(path: str) -> str:
    return _token_of(os.stat(path))


def _token_of(st: os.stat_result) -> str:
    """Changes with every atomic write (a rename brings a new inode)."""
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"
