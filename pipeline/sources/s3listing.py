"""S3 INPUTs: a prefix listed page by page, one object, and an S3 Inventory's objects."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .. import inputs, inventory, storage
from ..exitcodes import ConfigError
from ..types import NULL_INT, ImageRef, S3Options
from .chunks import RefChunk, SourceStats, growing_chunks
from .ids import IMAGE_EXTENSIONS, is_image_name, path_id


S3_STAT_CHUNK = 256  # manifest entries stat'ed together (inputs.stat_many)


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


def s3_image_refs(uri: str, s3: S3Options) -> Iterator[ImageRef]:
    """The ref of an INPUT that is one s3:// image (prefixes are listed by listed_chunks)."""
    return iter([inputs.open_input(uri, s3).stat().ref(path_id(uri.rsplit("/", 1)[-1]))])


def listed_chunks(uri: str, stats: SourceStats, s3: S3Options,
                  stop: Callable[[], bool] = lambda: False) -> Iterator[RefChunk]:
    """A prefix, page by page (ListObjectsV2), in chunks of 1, 2, 4, ... 1024 objects: labeling
    starts after the first page, and a chunk is filtered as columns."""
    import pyarrow as pa

    bucket, prefix = storage.split(uri)[0], storage.key_prefix(uri)
    for rows in growing_chunks(storage.iter_objects(uri, s3), stop):
        keys, size, mtime_ns = zip(*rows)
        chunk = object_chunk(pa.repeat(bucket, len(keys)), pa.array(keys, pa.string()),
                             np.array(size, np.int64),
                             np.array([NULL_INT if m is None else m for m in mtime_ns], np.int64),
                             prefix, stats)
        if len(chunk):
            yield chunk


def inventory_chunks(inv: inventory.Inventory, prefix: str, stats: SourceStats, s3: S3Options
                     ) -> Iterator[RefChunk]:
    """The inventory's current objects under `prefix`, ids relative to it, a record batch at a
    time: the same refs as listing s3://BUCKET/PREFIX would give, with size and mtime as of the
    inventory."""
    prefix = prefix.lstrip("/")
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    for objects in inventory.iter_columns(inv, s3):
        chunk = object_chunk(objects.bucket, objects.key, objects.size, objects.mtime_ns, prefix,
                             stats)
        if len(chunk):
            yield chunk


# A key whose last segment has an image extension (any ASCII case); IMAGE_EXTENSIONS as a regex
_IMAGE_KEY = r"\.(?:" + "|".join(sorted(e[1:] for e in IMAGE_EXTENSIONS)) + ")$"


def object_chunk(bucket, keys, size: np.ndarray, mtime_ns: np.ndarray, prefix: str,
                 stats: SourceStats) -> RefChunk:
    """The image objects among `keys` (pyarrow strings; `bucket` one per key) under `prefix`,
    as a RefChunk whose ids are the keys relative to it, filtered as columns with the rules of
    one key at a time: a folder marker is left out; a hidden key (also under a hidden
    "directory") or another file is counted in stats.ignored, as a directory walk counts them
    (the walk counts a hidden directory once, a listing each key under it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if prefix:
        under = np.flatnonzero(pc.starts_with(keys, prefix).to_numpy(zero_copy_only=False))
        bucket, keys = bucket.take(pa.array(under)), keys.take(pa.array(under))
        size, mtime_ns = size[under], mtime_ns[under]
    ids = pc.utf8_slice_codeunits(keys, len(prefix))  # code points, despite its name
    named = pc.and_(pc.greater(pc.binary_length(ids), 0),
                    pc.invert(pc.ends_with(keys, "/"))).to_numpy(zero_copy_only=False)
    image = pc.and_(pc.match_substring_regex(pc.ascii_lower(ids), _IMAGE_KEY),
                    pc.invert(pc.match_substring_regex(ids, r"(?:^|/)\."))
                    ).to_numpy(zero_copy_only=False)
    stats.ignored += int((named & ~image).sum())
    rows = np.flatnonzero(named & image)
    if len(rows) < len(ids):
        taken = pa.array(rows, pa.int64())
        bucket, keys, ids = bucket.take(taken), keys.take(taken), ids.take(taken)
        size, mtime_ns = size[rows], mtime_ns[rows]
    ids = _path_ids(ids)

    def make_refs(rows: np.ndarray) -> list[ImageRef]:
        taken = pa.array(rows, pa.int64())
        return [ImageRef(image_id, f"{storage.S3_SCHEME}{b}/{key}", int(size[i]),
                         None if mtime_ns[i] == NULL_INT else int(mtime_ns[i]))
                for i, image_id, b, key in zip(rows.tolist(), ids.take(taken).to_pylist(),
                                               bucket.take(taken).to_pylist(),
                                               keys.take(taken).to_pylist())]

    return RefChunk(ids, size, mtime_ns, make_refs)


def _path_ids(ids):
    """`path_id` of each id: in Python only for the ids it changes (a backslash or a NUL)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    odd = pc.match_substring_regex(ids, r"[\\\x00]")
    if not pc.any(odd).as_py():
        return ids
    return pc.replace_with_mask(ids, odd, pa.array([path_id(i) for i in ids.filter(odd).to_pylist()],
                                                   pa.string()))


