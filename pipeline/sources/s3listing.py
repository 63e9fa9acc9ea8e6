"""S3 INPUTs: a prefix listed page by page, one object, an S3 Inventory's objects, and the
stat of s3:// paths a manifest names."""
from __future__ import annotations

from typing import Iterator

from .. import inventory, storage
from ..exitcodes import ConfigError
from ..types import ImageRef, S3Options
from .chunks import SourceStats
from .ids import is_hidden, is_image_name, path_id


S3_STAT_CHUNK = 256


def describe_s3(uri: str, s3: S3Options) -> str:
    from pyarrow import fs

    if uri.endswith("/"):
        return "directory"
    try:
        info = storage.file_info(uri, s3)
    except OSError as e:
        raise ConfigError(f"cannot reach input {uri}: {e}") from e
    if info.type == fs.FileType.Directory:
        return "directory"
    if info.type == fs.FileType.NotFound:
        raise ConfigError(f"input not found: {uri}")
    if is_image_name(uri):
        return "image"
    raise ConfigError(f"input {uri} is neither a prefix nor an image (a manifest must be a local "
                      "file; it may list s3:// paths)")


def s3_refs(uri: str, kind: str, stats: SourceStats, s3: S3Options) -> Iterator[ImageRef]:
    if kind == "image":
        return s3_stat([(path_id(uri.rsplit("/", 1)[-1]), uri)], s3)
    return _listed_refs(uri, stats, s3)


def _listed_refs(uri: str, stats: SourceStats, s3: S3Options) -> Iterator[ImageRef]:
    """A prefix, page by page (ListObjectsV2): labeling starts after the first page."""
    bucket, prefix = storage.split(uri)[0], storage.key_prefix(uri)
    for key, size, mtime_ns in storage.iter_objects(uri, s3):
        ref = _object_ref(bucket, key, key[len(prefix):], size, mtime_ns, stats)
        if ref is not None:
            yield ref


def inventory_refs(inv: inventory.Inventory, prefix: str, stats: SourceStats, s3: S3Options
                    ) -> Iterator[ImageRef]:
    """The inventory's current objects under `prefix`, ids relative to it: the same refs as
    listing s3://BUCKET/PREFIX would give, with size and mtime as of the inventory."""
    prefix = prefix.lstrip("/")
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    for obj in inventory.iter_objects(inv, s3):
        if obj.key.startswith(prefix):
            ref = _object_ref(obj.bucket, obj.key, obj.key[len(prefix):], obj.size, obj.mtime_ns,
                              stats)
            if ref is not None:
                yield ref


def _object_ref(bucket: str, key: str, image_id: str, size: int, mtime_ns: int | None,
                stats: SourceStats) -> ImageRef | None:
    """An image object's ref; None for a folder marker, or a hidden key (also under a hidden
    "directory") or another file (both counted in stats.ignored, as a directory walk counts
    them; the walk counts a hidden directory once, a listing each key under it)."""
    name = key.rsplit("/", 1)[-1]
    if not name or not image_id:  # folder markers
        return None
    if is_image_name(name) and not any(is_hidden(part) for part in image_id.split("/")):
        return ImageRef(path_id(image_id), f"{storage.S3_SCHEME}{bucket}/{key}", size, mtime_ns)
    stats.ignored += 1
    return None


def _s3_ref(image_id: str, info) -> ImageRef:
    from pyarrow import fs

    uri = storage.S3_SCHEME + info.path
    if info.type != fs.FileType.File:
        return ImageRef(image_id, uri, None, None)
    return ImageRef(image_id, uri, info.size, info.mtime_ns)


def s3_stat(rows: list[tuple[str, str]], s3: S3Options) -> Iterator[ImageRef]:
    if not rows:
        return iter(())
    plain = [(i, u) for i, u in rows if storage.pyarrow_can_address(u)]
    infos = iter(storage.filesystem(s3).get_file_info([storage.fs_path(u) for _, u in plain]))
    return iter([_s3_ref(image_id, next(infos)) if storage.pyarrow_can_address(uri)
                 else _raw_key_ref(image_id, uri, s3) for image_id, uri in rows])


def _raw_key_ref(image_id: str, uri: str, s3: S3Options) -> ImageRef:
    found = storage.head_raw_key(uri, s3)
    return ImageRef(image_id, uri, *(found or (None, None)))
