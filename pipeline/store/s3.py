"""An OUTPUT under an s3:// prefix. Objects are written whole (one PUT, or a multipart upload
for a large file: S3 shows either only when complete) and addressed by their raw keys through
boto3; pyarrow's S3 filesystem reads the data files for scans."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Callable, Iterator, Sequence, cast

from .. import storage
from ..exitcodes import ConfigError, LockedError
from ..types import S3Options
from . import layout, lock
from .base import READ_CHUNK, OutputError, Store, StoredFile

# Files up to this size are one PUT; larger ones a multipart upload in pieces of this size.
MULTIPART_PIECE = 64 << 20
DELETE_BATCH = 1000  # keys per DeleteObjects request (S3's maximum)
_CHANGED = ("PreconditionFailed", "ConditionalRequestConflict")
_MISSING = ("NoSuchKey", "404", "NotFound")


class S3Store(Store):
    leftover_directories = ("", layout.INDEX)  # no temp files on S3: only staged ones

    def __init__(self, output: str, s3: S3Options):
        super().__init__(output)
        self.s3 = s3
        self.bucket, _ = storage.split(output)  # ConfigError without a bucket
        self.prefix = storage.key_prefix(output)
        if "//" in self.prefix:
            raise ConfigError(
                f"OUTPUT {output}: an S3 prefix with an empty segment ('//') cannot be an OUTPUT "
                "(pyarrow's S3 filesystem, through which parts are written and read, and "
                "DuckDB refuse such keys); use a prefix without '//'")

    def key(self, name: str) -> str:
        return self.prefix + name

    def uri(self, name: str = "") -> str:
        return f"{storage.S3_SCHEME}{self.bucket}/{self.key(name)}"

    @property
    def _client(self):
        return storage.client(self.s3)

    def files(self, directory: str = "") -> list[StoredFile]:
        start = self.key(directory + "/" if directory else "")
        found = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start, Delimiter="/",
                PaginationConfig={"PageSize": storage.LIST_PAGE_SIZE})
            for page in pages:
                for obj in page.get("Contents", ()):
                    name = obj["Key"][len(self.prefix):]
                    if name.rsplit("/", 1)[-1]:  # not a folder marker
                        found.append(StoredFile(name, obj["Size"]))
        except Exception as e:
            if storage.error_code(e) == "NoSuchBucket":
                return []
            raise storage.as_os_error(e, f"cannot list {self.uri(directory)}", self.s3) from e
        return sorted(found, key=lambda f: f.name)

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        """A (ranged) GET of the raw key."""
        if limit == 0:
            return b""
        extra = {"Range": f"bytes=0-{limit - 1}"} if limit is not None else {}
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self.key(name),
                                           **extra)["Body"].read()
        except Exception as e:
            if storage.error_code(e) == "InvalidRange":  # a ranged GET of an empty object
                return b""
            raise self._read_error(e, name) from e

    def open_local(self, name: str, each: Callable[[bytes], object]) -> BinaryIO:
        """One GET streamed into an unnamed temporary file (O_TMPFILE where there is one)."""
        f = tempfile.TemporaryFile(prefix="pipeline-download-")
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"]
            for chunk in body.iter_chunks(READ_CHUNK):
                each(chunk)
                f.write(chunk)
            f.flush()
            f.seek(0)
        except BaseException as e:
            f.close()
            if isinstance(e, Exception) and not isinstance(e, OSError):
                raise self._read_error(e, name) from None
            raise
        return f

    def _read_error(self, e: Exception, name: str) -> OSError:
        if storage.error_code(e) in _MISSING:
            return FileNotFoundError(f"no such object: {self.uri(name)}")
        return storage.as_os_error(e, f"cannot read {self.uri(name)}", self.s3)

    def arrow(self, names: Sequence[str]):
        return [f"{self.bucket}/{self.key(n)}" for n in names], storage.filesystem(self.s3)

    def write_file(self, name: str, write: Callable[[BinaryIO], object],
                   fenced: bool = True) -> None:
        # in memory up to one PUT's size (a part is a few MB), beyond that (the done index's
        # arrays) spilled to an unnamed temporary file in TMPDIR and uploaded in pieces
        with tempfile.SpooledTemporaryFile(MULTIPART_PIECE, prefix="pipeline-upload-") as spool:
            sink = cast(BinaryIO, spool)
            write(sink)
            sink.seek(0)
            self._multipart_upload(name, sink, fenced)

    @contextlib.contextmanager
    def writing(self, name: str, fenced: bool = True) -> Iterator[str]:
        with tempfile.TemporaryDirectory(prefix="pipeline-upload-") as tmp:
            path = os.path.join(tmp, "file")
            yield path
            with open(path, "rb") as f:
                self._multipart_upload(name, f, fenced)

    def _put(self, name: str, data: bytes, **conditions) -> str:
        """One PutObject (atomic); its ETag. S3Error on failure."""
        return storage.put_bytes(self.uri(name), data, self.s3, **conditions)

    def _multipart_upload(self, name: str, source: BinaryIO, fenced: bool) -> None:
        """Upload `source` in pieces of MULTIPART_PIECE (one PUT if it is no bigger); S3 shows
        the object only when the upload completes, which is the fenced moment."""
        first = source.read(MULTIPART_PIECE)
        following = source.read(MULTIPART_PIECE)
        if not following:
            if fenced:
                self.fence()
            try:
                self._put(name, first)
            except OSError as e:
                raise OutputError(str(e)) from e
            return
        key, client = self.key(name), self._client
        try:
            upload = client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        except Exception as e:
            raise OutputError(str(storage.as_os_error(e, f"cannot write {self.uri(name)}",
                                                      self.s3))) from e
        try:
            pieces, piece, number = [], first, 1
            while piece:
                etag = client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload,
                                          PartNumber=number, Body=piece)["ETag"]
                pieces.append({"PartNumber": number, "ETag": etag})
                piece, following = following, source.read(MULTIPART_PIECE)
                number += 1
            if fenced:
                self.fence()
            client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload,
                                             MultipartUpload={"Parts": pieces})
        except BaseException as e:
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            if isinstance(e, Exception) and not isinstance(e, (OutputError, LockedError)):
                raise OutputError(str(storage.as_os_error(e, f"cannot write {self.uri(name)}",
                                                          self.s3))) from e
            raise

    def create_bytes(self, name: str, data: bytes) -> str | None:
        return self._conditional_put(name, data, IfNoneMatch="*")

    def replace_bytes(self, name: str, data: bytes, token: str) -> str | None:
        return self._conditional_put(name, data, IfMatch=token)

    def _conditional_put(self, name: str, data: bytes, **condition) -> str | None:
        try:
            return self._put(name, data, **condition)
        except storage.S3Error as e:
            if e.code in _CHANGED or e.code in _MISSING:
                return None
            raise

    def read_versioned(self, name: str) -> tuple[bytes, str, float] | None:
        return storage.get_object(self.uri(name), self.s3)

    def _delete(self, names: list[str]) -> None:
        for start in range(0, len(names), DELETE_BATCH):
            batch = names[start:start + DELETE_BATCH]
            try:
                answer = self._client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self.key(n)} for n in batch], "Quiet": True})
            except Exception as e:
                raise storage.as_os_error(e, f"cannot delete in {self.uri()}", self.s3) from e
            failed = answer.get("Errors") or []
            if failed:
                raise OutputError(f"cannot delete {self.uri(failed[0]['Key'][len(self.prefix):])}"
                                  f": {failed[0].get('Message')} ({len(failed)} object(s))")

    def _publish(self, moves: list[tuple[str, str]]) -> None:
        for staged, final in moves:  # copied server-side (up to 5 GB), then the staged one goes
            try:
                self._client.copy_object(Bucket=self.bucket, Key=self.key(final),
                                         CopySource={"Bucket": self.bucket, "Key": self.key(staged)})
            except Exception as e:
                raise storage.as_os_error(e, f"cannot publish {self.uri(final)}", self.s3) from e
        self._delete([staged for staged, _ in moves])

    def prepare(self) -> None:
        storage.client(self.s3)  # ConfigError now if boto3 is missing; S3 errors at the lock

    def require_existing(self) -> None:
        """ConfigError if no object has a key under the prefix (or the bucket is missing)."""
        try:
            found = self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix,
                                                 MaxKeys=1).get("KeyCount", 0)
        except Exception as e:
            if storage.error_code(e) != "NoSuchBucket":
                raise storage.as_os_error(e, f"cannot list {self.uri()}", self.s3) from e
            found = 0
        if not found:
            raise ConfigError(f"OUTPUT not found: there is no object under {self.output}")

    def _lock(self, command: str, lease: float, clock):
        return lock.s3_lease(self, command, lease, clock)
