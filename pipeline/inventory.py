"""AWS S3 Inventory as the listing: a `manifest.json` names data files (CSV.gz, Parquet or ORC)
whose rows are the bucket's objects, so a bucket of a billion keys is read without LIST calls.

The format is AWS's (docs: "Locating your inventory list", "Inventory manifest"):
`fileFormat`, `fileSchema` (the column list), `destinationBucket` (an ARN) and `files`
(`key`, `size`, `MD5checksum`), each file a key in the destination bucket. Data files are read
one at a time into a temporary file, checked against their MD5 and then streamed in batches, so
memory does not grow with the inventory.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from . import inputs, storage
from .exitcodes import ConfigError, FatalError
from .imageinfo import ImageError
from .types import NULL_INT, S3Options, timestamps_ns

MANIFEST_NAME = "manifest.json"
FORMATS = ("CSV", "Parquet", "ORC")
# Parquet/ORC column names; the CSV fileSchema names the same fields in CamelCase.
NEEDED = ("bucket", "key", "size", "last_modified_date")
OPTIONAL = ("is_latest", "is_delete_marker")  # present in an inventory of every object version
BATCH_ROWS = 65536


class InventoryError(FatalError, OSError):
    """A data file is missing or does not match its manifest: exit 4, the run can be repeated
    once the inventory is complete."""

    hint = ("committed parts are kept; use a complete inventory (or wait for this one to be "
            "written) and run again")


@dataclass(frozen=True)
class Inventory:
    uri: str  # where manifest.json was read
    file_format: str  # CSV | Parquet | ORC
    columns: tuple[str, ...]  # snake_case, in file order
    destination_bucket: str
    files: tuple[tuple[str, int | None, str | None], ...]  # (key, size, MD5 hex)


@dataclass(frozen=True)
class InventoryObject:
    bucket: str
    key: str
    size: int
    mtime_ns: int | None


def is_manifest(path: str) -> bool:
    return os.path.basename(path.rstrip("/")) == MANIFEST_NAME


def read_manifest(uri: str, s3: S3Options = S3Options()) -> Inventory:
    """Parse and check manifest.json (a local path or s3:// URI); ConfigError says what is wrong."""
    try:
        raw = inputs.open_input(uri, s3).read()
    except ImageError as e:  # missing, or not a regular file (a directory, a FIFO)
        if e.kind == "not_found":
            raise ConfigError(f"inventory manifest not found: {uri}") from None
        raise ConfigError(f"inventory manifest {uri} cannot be read: {e}") from None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"inventory manifest {uri} is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"inventory manifest {uri} is not a JSON object")
    missing = [k for k in ("fileFormat", "fileSchema", "files", "destinationBucket") if k not in doc]
    if missing:
        raise ConfigError(f"{uri} is not an S3 Inventory manifest: it lacks {', '.join(missing)}")
    file_format = next((f for f in FORMATS if f.lower() == str(doc["fileFormat"]).lower()), None)
    if file_format is None:
        raise ConfigError(f"inventory {uri}: fileFormat {doc['fileFormat']!r} is not one of "
                          f"{', '.join(FORMATS)}")
    columns = schema_columns(str(doc["fileSchema"]))
    absent = [c for c in NEEDED if c not in columns]
    if absent:
        raise ConfigError(f"inventory {uri} has no {', '.join(absent)} field(s); configure the "
                          "inventory with Size and LastModifiedDate (they decide what changed)")
    files = tuple((str(f["key"]), f.get("size"), f.get("MD5checksum")) for f in doc["files"])
    return Inventory(uri, file_format, columns, _bucket_name(str(doc["destinationBucket"])), files)


def schema_columns(schema: str) -> tuple[str, ...]:
    """Field names, snake_case, from any of the three fileSchema notations:
    CSV "Bucket, Key, Size", Parquet "message s3.inventory { required binary bucket (UTF8); ...}",
    ORC "struct<bucket:string,key:string,...>"."""
    schema = schema.strip()
    if schema.startswith("message"):
        body = schema[schema.index("{") + 1: schema.rindex("}")]
        fields = [f.split("(")[0].split()[-1] for f in body.split(";") if f.strip()]
    elif schema.startswith("struct<"):
        fields = [f.split(":")[0] for f in schema[len("struct<"):-1].split(",")]
    else:
        fields = [_snake(f.strip()) for f in schema.split(",")]
    return tuple(f.strip() for f in fields)


def _snake(name: str) -> str:
    """CSV field names in the manifest -> the Parquet/ORC names: LastModifiedDate ->
    last_modified_date, ETag -> e_tag, VersionId -> version_id."""
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and (not name[i - 1].isupper() or
                                   (i + 1 < len(name) and name[i + 1].islower())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def _bucket_name(destination: str) -> str:
    return destination.rsplit(":::", 1)[-1]


def iter_objects(inv: Inventory, s3: S3Options = S3Options()) -> Iterator[InventoryObject]:
    """Every current object the inventory lists (old versions and delete markers left out)."""
    for objects in iter_columns(inv, s3):
        for bucket, key, size, mtime in zip(objects.bucket.to_pylist(), objects.key.to_pylist(),
                                            objects.size.tolist(), objects.mtime_ns.tolist()):
            yield InventoryObject(bucket, key, size, None if mtime == NULL_INT else mtime)


@dataclass(frozen=True)
class ObjectColumns:
    """A batch of current objects as columns: bucket and key (pyarrow strings, keys decoded),
    size and mtime in ns (int64 numpy; mtime NULL_INT where null or out of range)."""
    bucket: Any
    key: Any
    size: np.ndarray
    mtime_ns: np.ndarray

    def __len__(self) -> int:
        return len(self.size)


def iter_columns(inv: Inventory, s3: S3Options = S3Options()) -> Iterator[ObjectColumns]:
    """`iter_objects` a record batch at a time, as columns: no Python object per row. Rows
    without a key or size are left out."""
    for key, size, md5 in inv.files:
        uri = f"{storage.S3_SCHEME}{inv.destination_bucket}/{key}"
        with tempfile.TemporaryDirectory(prefix="pipeline-inventory-") as tmp:
            local = os.path.join(tmp, "data")
            _download_checked(uri, local, size, md5, s3)
            yield from _columns(local, inv, uri)


def _download_checked(uri: str, local: str, size: int | None, md5: str | None,
                      s3: S3Options) -> None:
    digest, written = hashlib.md5(), 0
    try:
        with storage.filesystem(s3).open_input_stream(storage.fs_path(uri), compression=None) as src, \
                open(local, "wb") as dst:
            while chunk := src.read(8 << 20):
                digest.update(chunk)
                dst.write(chunk)
                written += len(chunk)
    except FileNotFoundError:
        raise InventoryError(f"inventory data file {uri} (named in its manifest.json) does not "
                             "exist") from None
    if size is not None and written != int(size):
        raise InventoryError(f"inventory data file {uri} has {written} bytes, its manifest.json "
                             f"says {size}")
    if md5 and digest.hexdigest() != str(md5).lower():
        raise InventoryError(f"inventory data file {uri} has MD5 {digest.hexdigest()}, its "
                             f"manifest.json says {md5}")


def _columns(local: str, inv: Inventory, uri: str) -> Iterator[ObjectColumns]:
    wanted = [c for c in NEEDED + OPTIONAL if c in inv.columns]
    try:
        for batch in _batches(local, inv, wanted):
            objects = _batch_columns(batch, inv.file_format == "CSV")
            if len(objects):
                yield objects
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        if isinstance(e, InventoryError):
            raise
        raise InventoryError(f"inventory data file {uri} is not readable as "
                             f"{inv.file_format}: {e}") from e


def _batches(local: str, inv: Inventory, wanted: list[str]):
    import pyarrow as pa

    if inv.file_format == "CSV":  # gzip, no header, every field quoted
        import pyarrow.csv as pacsv

        types = {"bucket": pa.string(), "key": pa.string(), "size": pa.int64(),
                 "last_modified_date": pa.timestamp("ms", tz="UTC"), "is_latest": pa.bool_(),
                 "is_delete_marker": pa.bool_()}
        stream = pa.input_stream(local, compression="gzip")
        return pacsv.open_csv(
            stream, read_options=pacsv.ReadOptions(column_names=list(inv.columns),
                                                   block_size=4 << 20),
            convert_options=pacsv.ConvertOptions(
                include_columns=wanted, column_types={c: types[c] for c in wanted}))
    if inv.file_format == "Parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(local).iter_batches(batch_size=BATCH_ROWS, columns=wanted)
    import pyarrow.orc as orc

    f = orc.ORCFile(local)
    return (f.read_stripe(i, columns=wanted) for i in range(f.nstripes))


def _batch_columns(batch, url_encoded: bool) -> ObjectColumns:
    import pyarrow as pa
    import pyarrow.compute as pc

    names = batch.schema.names
    keep = pc.and_(pc.is_valid(batch.column("key")), pc.is_valid(batch.column("size")))
    if "is_latest" in names:
        keep = pc.and_(keep, pc.fill_null(batch.column("is_latest"), True))
    if "is_delete_marker" in names:
        keep = pc.and_(keep, pc.invert(pc.fill_null(batch.column("is_delete_marker"), False)))
    batch = batch.filter(keep)
    mtimes = batch.column("last_modified_date")
    if not pa.types.is_timestamp(mtimes.type):
        raise InventoryError(f"last_modified_date is {mtimes.type}, not a timestamp")
    key = batch.column("key").cast(pa.string())
    if url_encoded:
        key = _unquoted(key)
    size = batch.column("size").cast(pa.int64()).to_numpy(zero_copy_only=False)
    return ObjectColumns(batch.column("bucket").cast(pa.string()), key, size,
                         timestamps_ns(mtimes))  # NULL_INT: null, or outside int64 nanoseconds


def _unquoted(keys):
    """CSV keys are form-encoded ('+' is a space, a real '+' is %2B): decoded, in Python only
    for the keys that hold a '%' or a '+'."""
    import pyarrow as pa
    import pyarrow.compute as pc

    encoded = pc.fill_null(pc.match_substring_regex(keys, "[%+]"), False)
    if not pc.any(encoded).as_py():
        return keys
    decoded = [urllib.parse.unquote_plus(k) for k in keys.filter(encoded).to_pylist()]
    return pc.replace_with_mask(keys, encoded, pa.array(decoded, pa.string()))
