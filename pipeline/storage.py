"""Local paths and s3:// URIs: reads via pyarrow.fs, writes via boto3.

Every function that talks to S3 is given the S3Options to use (no process-wide setting: a Ray
task or actor gets them passed like everything else). Local paths never come here except
through `is_s3`, asked by the two interfaces over local and S3: pipeline/inputs.py (INPUT) and
pipeline/store/ (OUTPUT).
Writes to S3 are single PutObject calls of complete bytes: S3 makes an object visible only when
its upload completed, so a killed or failed write leaves nothing half-written (pyarrow's output
stream would upload whatever was buffered when it is closed during an exception).
"""
from __future__ import annotations

import calendar
import datetime
import functools
import queue
import threading
from typing import Iterator

from .exitcodes import ConfigError, FatalError
from .types import S3Options

S3_SCHEME = "s3://"


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


class S3Unavailable(FatalError, OSError):
    """S3 did not answer within the retry budget: the run stops (exit 4) and resumes next time."""

    hint = "committed parts are kept, run the same command again to resume"


def split(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    rest = uri[len(S3_SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ConfigError(f"not an S3 URI with a bucket: {uri}")
    return bucket, key


def fs_path(uri: str) -> str:
    """The path pyarrow's S3FileSystem uses: bucket/key (no scheme, no trailing slash)."""
    return uri[len(S3_SCHEME):].rstrip("/")


def filesystem(s3: S3Options):
    """The pyarrow S3FileSystem for `s3` (one per process and options)."""
    return _filesystem(s3)


@functools.lru_cache(maxsize=4)
def _filesystem(opts: S3Options):
    from pyarrow import fs

    endpoint = opts.endpoint_url
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    return fs.S3FileSystem(
        region=opts.region_name,
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=opts.max_attempts),
        connect_timeout=opts.connect_timeout, request_timeout=opts.request_timeout, **kwargs)


def client(s3: S3Options):
    """A boto3 S3 client with the same endpoint, region, timeouts and retry budget."""
    return _client(s3)


@functools.lru_cache(maxsize=4)
def _client(opts: S3Options):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("S3 needs boto3 (listing, writing): pip install 'pipeline[s3]'") from None
    config = Config(connect_timeout=opts.connect_timeout, read_timeout=opts.request_timeout,
                    retries={"max_attempts": opts.max_attempts, "mode": "standard"})
    return boto3.client("s3", endpoint_url=opts.endpoint_url, region_name=opts.region_name,
                        config=config)


def read_bytes(uri: str, s3: S3Options, limit: int | None = None) -> bytes:
    """The object's bytes; with `limit`, at most that many (a ranged GET: a huge or growing
    object costs no more)."""
    if not pyarrow_can_address(uri):
        return _get_raw_key(uri, s3, limit)
    with filesystem(s3).open_input_stream(fs_path(uri)) as f:
        return f.read() if limit is None else f.read(limit)


def pyarrow_can_address(uri: str) -> bool:
    """False for keys with an empty segment (`a//b.jpg`, a key starting with `/`): legal in S3,
    refused by pyarrow's S3FileSystem ("Empty path component"); boto3 takes the raw key."""
    return "//" not in fs_path(uri)


def _get_raw_key(uri: str, s3: S3Options, limit: int | None) -> bytes:
    found = get_object(uri, s3, limit)
    if found is None:
        raise FileNotFoundError(2, "object not found", uri)
    return found[0]


def head_raw_key(uri: str, s3: S3Options) -> tuple[int, int] | None:
    """(size, mtime ns) of a key pyarrow cannot address, or None if there is no such object."""
    bucket, key = split(uri)
    try:
        r = client(s3).head_object(Bucket=bucket, Key=key)
    except Exception as e:
        if error_code(e) in ("NoSuchKey", "404", "NotFound"):
            return None
        raise as_os_error(e, f"cannot stat {uri}", s3) from e
    return int(r["ContentLength"]), epoch_ns(r["LastModified"])


class S3Error(OSError):
    """An S3 request failed (after its retries); `code` is S3's error code if it answered."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


def put_bytes(uri: str, data: bytes, s3: S3Options, **conditions) -> str:
    """Upload complete bytes as one object (atomic); returns its ETag. S3Error on failure.

    conditions: IfNoneMatch="*" (create only) or IfMatch=etag (replace only that version)."""
    bucket, key = split(uri)
    try:
        return client(s3).put_object(Bucket=bucket, Key=key, Body=data, **conditions)["ETag"]
    except Exception as e:
        raise as_os_error(e, f"cannot write {uri}", s3) from e


def get_object(uri: str, s3: S3Options, limit: int | None = None
               ) -> tuple[bytes, str, float] | None:
    """(body, ETag, last-modified epoch seconds) or None if there is no such object; with
    `limit`, at most that many bytes of the body (a ranged GET)."""
    bucket, key = split(uri)
    ranged = {} if limit is None else {"Range": f"bytes=0-{max(limit - 1, 0)}"}
    try:
        r = client(s3).get_object(Bucket=bucket, Key=key, **ranged)
        return r["Body"].read(), r["ETag"], r["LastModified"].timestamp()
    except Exception as e:
        if error_code(e) in ("NoSuchKey", "404"):
            return None
        raise as_os_error(e, f"cannot read {uri}", s3) from e


def error_code(e: Exception) -> str | None:
    """The S3 error code of a botocore ClientError ('PreconditionFailed', 'NoSuchKey' ...)."""
    response = getattr(e, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def as_os_error(e: Exception, what: str, s3: S3Options) -> S3Error:
    code = error_code(e)
    if code is None:  # no answer at all (timeouts, refused connections)
        return S3Error(f"S3 unreachable: {what} after {s3.max_attempts} attempts: {e}")
    return S3Error(f"{what}: {e}", code)


# Keys per ListObjectsV2 request (S3's maximum); a page is all the listing holds at once.
LIST_PAGE_SIZE = 1000
LIST_AHEAD = 2  # pages fetched ahead of the one being consumed


def iter_objects(uri: str, s3: S3Options) -> Iterator[tuple[str, int, int]]:
    """(key, size, mtime_ns) of every object under the prefix, in key order, one page at a time.

    The next pages are fetched on a thread while this one is consumed (at most LIST_AHEAD
    pages held). A request that fails after its retries raises (S3Unavailable if S3 did not
    answer, else S3Error) where the listing has got to: a listing that stops is never taken
    as complete."""
    pages = client(s3).get_paginator("list_objects_v2").paginate(  # ConfigError without boto3
        Bucket=split(uri)[0], Prefix=key_prefix(uri), PaginationConfig={"PageSize": LIST_PAGE_SIZE})
    for page in _ahead(_checked_pages(iter(pages), uri, s3), LIST_AHEAD):
        for obj in page.get("Contents", ()):
            yield obj["Key"], obj["Size"], epoch_ns(obj["LastModified"])


def _checked_pages(pages: Iterator[dict], uri: str, s3: S3Options) -> Iterator[dict]:
    from botocore.exceptions import BotoCoreError, ClientError

    while True:
        try:
            page = next(pages)
        except StopIteration:
            return
        except (BotoCoreError, ClientError) as e:
            if error_code(e) == "NoSuchBucket":
                raise ConfigError(f"input not found: {uri} (no such bucket)") from None
            raise _listing_error(e, uri, s3) from e
        yield page


_DONE = object()


def _ahead(items: Iterator, depth: int) -> Iterator:
    """`items`, produced on a thread up to `depth` ahead of the consumer; the producer's
    exception is raised here, after the items it produced before it."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _DONE))
        except BaseException as e:  # handed to the consumer
            put((False, e))

    threading.Thread(target=produce, name="s3-listing", daemon=True).start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()  # the consumer stopped early: the producer ends at its next put


def key_prefix(uri: str) -> str:
    """The keys under s3://bucket/a/b (or .../a/b/) start with "a/b/"; under s3://bucket/, ""."""
    key = split(uri)[1].strip("/")
    return key + "/" if key else ""


def _listing_error(e: Exception, uri: str, s3: S3Options) -> OSError:
    if error_code(e) is None:
        return S3Unavailable(f"S3 unreachable: cannot list {uri} after {s3.max_attempts} "
                             f"attempts: {e}")
    return S3Error(f"cannot list {uri}: {e}", error_code(e))


def epoch_ns(when: datetime.datetime) -> int:
    """An aware datetime as integer ns since the epoch (exact: no float on the way)."""
    return calendar.timegm(when.utctimetuple()) * 10**9 + when.microsecond * 1000


def file_info(uri: str, s3: S3Options):
    return filesystem(s3).get_file_info(fs_path(uri))
