"""Enumerate inputs as a stream of ImageRef: a directory walk, a txt/csv/parquet manifest, an
S3 prefix or an S3 Inventory."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from .. import inventory, storage
from ..exitcodes import ConfigError
from ..types import ImageRef, S3Options
from .chunks import KnownIds, RefChunk, SourceStats, counted, counted_chunks, growing_chunks
from .ids import IMAGE_EXTENSIONS, is_hidden, is_image_name, path_id
from .manifests import (MANIFEST_CHUNK, TRUSTED_COLUMNS, check_manifest, is_columnar,
                        manifest_chunks, manifest_refs, read_manifest)
from .s3listing import S3_STAT_CHUNK, describe_s3, inventory_chunks, listed_chunks, s3_image_refs
from .walk import local_ref, walk_chunks

__all__ = ["IMAGE_EXTENSIONS", "KnownIds", "MANIFEST_CHUNK", "MANIFEST_EXTENSIONS",
           "S3_STAT_CHUNK", "TRUSTED_COLUMNS", "RefChunk", "SourceStats", "check_manifest", "describe_input",
           "is_hidden", "is_image_name", "iter_chunks", "iter_refs", "local_ref", "path_id",
           "read_manifest"]

MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")


def describe_input(path: str, s3: S3Options = S3Options()) -> str:
    """'directory', 'manifest', 'inventory', 'image' or raise ConfigError with what is wrong
    (for a CSV manifest: its first malformed row, wherever it is)."""
    return _checked_kind(path, s3).removeprefix(_S3)


_S3 = "s3 "  # the kinds of an s3:// INPUT: "s3 directory" (a prefix), "s3 image"


def _checked_kind(path: str, s3: S3Options) -> str:
    kind = _input_kind(path, s3)
    if kind == "manifest":
        check_manifest(Path(path))
    return kind


def _input_kind(path: str, s3: S3Options) -> str:
    if inventory.is_manifest(path):
        inventory.read_manifest(path, s3)  # a wrong manifest is a usage error, OUTPUT untouched
        return "inventory"
    if storage.is_s3(path):  # listed by ListObjectsV2, not walked
        return _S3 + describe_s3(path, s3)
    p = Path(path)
    if p.is_dir():
        return "directory"
    if not p.exists():
        raise ConfigError(f"input not found: {path}")
    if p.suffix.lower() in MANIFEST_EXTENSIONS:
        return "manifest"
    if is_image_name(p.name):
        return "image"
    raise ConfigError(
        f"input {path} is neither a directory, an image, nor a manifest "
        f"({', '.join(MANIFEST_EXTENSIONS)})"
    )


def iter_refs(input_path: str, stats: SourceStats | None = None,
              inventory_prefix: str = "", s3: S3Options = S3Options()) -> Iterator[ImageRef]:
    """Stream ImageRefs for INPUT (ids unique); a bad INPUT raises ConfigError right away.

    Nothing is listed ahead of what the caller pulls (an S3 prefix a page at a time); a
    listing that fails part-way raises where it stopped, never ends the stream early.
    `inventory_prefix`: for an S3 Inventory INPUT, only keys under it, ids relative to it.
    `s3`: how to reach S3 (an s3:// INPUT, an inventory, or a manifest listing s3:// paths)."""
    stats = stats if stats is not None else SourceStats()
    kind = _input_kind_for(input_path, inventory_prefix, s3)
    chunks = _columnar_chunks(input_path, kind, stats, inventory_prefix, s3, lambda: False, None)
    if chunks is not None:
        return (ref for chunk in counted_chunks(chunks, stats) for ref in chunk.refs())
    return counted(_refs(input_path, kind, stats, inventory_prefix, s3), stats)


def _refs(input_path: str, kind: str, stats: SourceStats, inventory_prefix: str,
          s3: S3Options) -> Iterator[ImageRef]:
    """The kinds `_columnar_chunks` leaves: a text manifest and a single image."""
    if kind == _S3 + "image":
        return s3_image_refs(input_path, s3)
    if kind == "manifest":
        return manifest_refs(Path(input_path), stats, s3)
    p = Path(input_path)
    return iter([local_ref(path_id(p.name), p)])


def _input_kind_for(input_path: str, inventory_prefix: str, s3: S3Options) -> str:
    kind = _checked_kind(input_path, s3)
    if inventory_prefix and kind != "inventory":
        raise ConfigError("--inventory-prefix applies to an S3 Inventory INPUT (a manifest.json)")
    return kind


def iter_chunks(input_path: str, stats: SourceStats | None = None, inventory_prefix: str = "",
                s3: S3Options = S3Options(), stop: Callable[[], bool] = lambda: False,
                known: KnownIds | None = None) -> Iterator[RefChunk]:
    """`iter_refs` as RefChunks: a CSV/Parquet manifest a record batch at a time, with no Python
    object per entry until `RefChunk.refs` (and no stat when it has size and mtime columns);
    other listings in chunks of 1, 2, 4, ... 1024 refs, so a slow listing does not hold back
    the first image. `stop()` is asked between two refs, and ends the stream when true.
    `known`: see KnownIds (a manifest's chunks then carry the done set's entries)."""
    stats = stats if stats is not None else SourceStats()
    kind = _input_kind_for(input_path, inventory_prefix, s3)
    chunks = _columnar_chunks(input_path, kind, stats, inventory_prefix, s3, stop, known)
    if chunks is not None:
        return counted_chunks(chunks, stats)
    refs = counted(_refs(input_path, kind, stats, inventory_prefix, s3), stats)
    return (RefChunk.of_refs(chunk) for chunk in growing_chunks(refs, stop))


def _columnar_chunks(input_path: str, kind: str, stats: SourceStats, inventory_prefix: str,
                     s3: S3Options, stop: Callable[[], bool], known: KnownIds | None
                     ) -> Iterator[RefChunk] | None:
    """The listing as RefChunks made from columns (no Python object per entry), or None for
    the kinds listed ref by ref."""
    if kind == "manifest" and is_columnar(input_path):
        return manifest_chunks(Path(input_path), stats, s3, known)
    if kind == "inventory":
        return inventory_chunks(inventory.read_manifest(input_path, s3), inventory_prefix, stats,
                                s3)
    if kind == _S3 + "directory":
        return listed_chunks(input_path, stats, s3, stop)
    if kind == "directory":
        return walk_chunks(Path(input_path), stats, stop)
    return None
