"""Local paths and s3:// URIs: one S3 configuration per process, reads via pyarrow.fs, writes via boto3.

Local paths never come here except through `is_s3` (the local code paths stay as they were).
Writes to S3 are single PutObject calls of complete bytes: S3 makes an object visible only when
its upload completed, so a killed or failed write leaves nothing half-written (pyarrow's output
stream would upload whatever was buffered when it is closed during an exception).
"""
from __future__ import annotations

import calendar
import datetime
import functools
import os
from dataclasses import dataclass
from typing import Iterator

from .config import ConfigError
from .exitcodes import FatalError

S3_SCHEME = "s3://"


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None  # e.g. http://127.0.0.1:9000; else AWS_ENDPOINT_URL; else AWS
    region: str | None = None  # else AWS_REGION / AWS_DEFAULT_REGION; else us-east-1
    max_attempts: int = 5  # per request, with exponential backoff (timeouts, 5xx, throttling)
    connect_timeout: float = 5.0
    request_timeout: float = 30.0

    @property
    def endpoint_url(self) -> str | None:
        return self.endpoint or os.environ.get("AWS_ENDPOINT_URL") or None

    @property
    def region_name(self) -> str:
        return (self.region or os.environ.get("AWS_REGION")
                or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


_options = S3Options()


class S3Unavailable(FatalError, OSError):
    """S3 did not answer within the retry budget: the run stops (exit 4) and resumes next time."""

    hint = "committed parts are kept, run the same command again to resume"


def current() -> S3Options:
    return _options


def configure(cfg) -> None:
    """Take the S3 settings of a RunConfig (call before touching any s3:// URI)."""
    global _options
    _options = S3Options(cfg.s3_endpoint, cfg.s3_region, cfg.s3_max_attempts,
                         cfg.s3_connect_timeout, cfg.s3_request_timeout)


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


def join(base: str, name: str) -> str:
    """Join an OUTPUT (local path or s3:// URI) and a name."""
    if is_s3(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def filesystem():
    """The pyarrow S3FileSystem for the current options (one per process and options)."""
    return _filesystem(_options)


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


def client():
    """A boto3 S3 client with the same endpoint, region, timeouts and retry budget."""
    return _client(_options)


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


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """The object's bytes; with `limit`, at most that many (a ranged GET: a huge or growing
    object costs no more)."""
    with filesystem().open_input_stream(fs_path(uri)) as f:
        return f.read() if limit is None else f.read(limit)


class S3Error(OSError):
    """An S3 request failed (after its retries); `code` is S3's error code if it answered."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


def put_bytes(uri: str, data: bytes, **conditions) -> str:
    """Upload complete bytes as one object (atomic); returns its ETag. S3Error on failure.

    conditions: IfNoneMatch="*" (create only) or IfMatch=etag (replace only that version)."""
    bucket, key = split(uri)
    try:
        return client().put_object(Bucket=bucket, Key=key, Body=data, **conditions)["ETag"]
    except Exception as e:
        raise as_os_error(e, f"cannot write {uri}") from e


def get_object(uri: str) -> tuple[bytes, str, float] | None:
    """(body, ETag, last-modified epoch seconds) or None if there is no such object."""
    bucket, key = split(uri)
    try:
        r = client().get_object(Bucket=bucket, Key=key)
        return r["Body"].read(), r["ETag"], r["LastModified"].timestamp()
    except Exception as e:
        if error_code(e) in ("NoSuchKey", "404"):
            return None
        raise as_os_error(e, f"cannot read {uri}") from e


def delete(uri: str) -> None:
    bucket, key = split(uri)
    try:
        client().delete_object(Bucket=bucket, Key=key)
    except Exception as e:
        raise as_os_error(e, f"cannot delete {uri}") from e


def error_code(e: Exception) -> str | None:
    """The S3 error code of a botocore ClientError ('PreconditionFailed', 'NoSuchKey' ...)."""
    response = getattr(e, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def as_os_error(e: Exception, what: str) -> S3Error:
    code = error_code(e)
    if code is None:  # no answer at all (timeouts, refused connections)
        return S3Error(f"S3 unreachable: {what} after {_options.max_attempts} attempts: {e}")
    return S3Error(f"{what}: {e}", code)


# Keys per ListObjectsV2 request (S3's maximum); a page is all the listing holds at once.
LIST_PAGE_SIZE = 1000


def iter_objects(uri: str) -> Iterator[tuple[str, int, int]]:
    """(key, size, mtime_ns) of every object under the prefix, in key order, one page at a time.

    A request that fails after its retries raises (S3Unavailable if S3 did not answer, else
    S3Error) wherever the listing has got to: a listing that stops is never taken as complete."""
    s3 = client()  # ConfigError if boto3 is missing
    from botocore.exceptions import BotoCoreError, ClientError

    pages = iter(s3.get_paginator("list_objects_v2").paginate(
        Bucket=split(uri)[0], Prefix=key_prefix(uri), PaginationConfig={"PageSize": LIST_PAGE_SIZE}))
    while True:
        try:
            page = next(pages)
        except StopIteration:
            return
        except (BotoCoreError, ClientError) as e:
            if error_code(e) == "NoSuchBucket":
                raise ConfigError(f"input not found: {uri} (no such bucket)") from None
            raise _listing_error(e, uri) from e
        for obj in page.get("Contents", ()):
            yield obj["Key"], obj["Size"], epoch_ns(obj["LastModified"])


def key_prefix(uri: str) -> str:
    """The keys under s3://bucket/a/b (or .../a/b/) start with "a/b/"; under s3://bucket/, ""."""
    key = split(uri)[1].strip("/")
    return key + "/" if key else ""


def _listing_error(e: Exception, uri: str) -> OSError:
    if error_code(e) is None:
        return S3Unavailable(f"S3 unreachable: cannot list {uri} after {_options.max_attempts} "
                             f"attempts: {e}")
    return S3Error(f"cannot list {uri}: {e}", error_code(e))


def epoch_ns(when: datetime.datetime) -> int:
    """An aware datetime as integer ns since the epoch (exact: no float on the way)."""
    return calendar.timegm(when.utctimetuple()) * 10**9 + when.microsecond * 1000


def list_files(uri: str, recursive: bool = True) -> list:
    """FileInfo of every object under the prefix, sorted (pyarrow lists it all at once)."""
    from pyarrow import fs

    selector = fs.FileSelector(fs_path(uri), recursive=recursive, allow_not_found=True)
    infos = filesystem().get_file_info(selector)
    return sorted((i for i in infos if i.type == fs.FileType.File), key=lambda i: i.path)


def file_info(uri: str):
    return filesystem().get_file_info(fs_path(uri))
