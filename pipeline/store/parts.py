"""Opening OUTPUT's data files: every one is checked against the output contract before it is
read, and a read error inside one becomes CorruptPart naming the file."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .base import OutputError, Store
from .schema import schema_problem


class CorruptPart(OutputError):
    """A `part-*.parquet` in OUTPUT that is not a readable part of ours (exit code 4)."""

    hint = ""  # the message itself says what to do with the file


def check_part(store: Store, name: str) -> pq.ParquetFile:
    """Open a part's footer and check its schema against the contract; CorruptPart names the
    file and what to do. Cheap: reads the footer only. Call it before reading any part."""
    (where,), filesystem = store.arrow([name])
    try:
        part = pq.ParquetFile(where, filesystem=filesystem)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _corrupt(store.uri(name), f"not a readable Parquet file ({_first_line(e)})") from None
    problem = schema_problem(part.schema_arrow)
    if problem:
        part.close()
        raise _corrupt(store.uri(name), f"not written by pipeline: {problem}")
    return part


@contextlib.contextmanager
def open_part(store: Store, name: str) -> Iterator[pq.ParquetFile]:
    """A checked part, closed afterwards; damaged pages read inside the block are CorruptPart."""
    with contextlib.closing(check_part(store, name)) as part, reading_part(store.uri(name)):
        yield part


@contextlib.contextmanager
def reading_part(where: str) -> Iterator[None]:
    """Turn a read error inside a part that passed check_part (damaged pages) into CorruptPart."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, OutputError):
            raise
        raise _corrupt(where, f"damaged ({_first_line(e)})") from None


def part_model(store: Store, name: str) -> str | None:
    """The model a part was written for (file metadata; parts hold one model each)."""
    with open_part(store, name) as part:
        meta = part.schema_arrow.metadata or {}
        if b"pipeline.model" in meta:
            return meta[b"pipeline.model"].decode()
        models = part.read(columns=["model"]).column("model").unique().to_pylist()
    return models[0] if len(models) == 1 else None


def _corrupt(path: str, reason: str) -> CorruptPart:
    return CorruptPart(f"{path} is {reason}. Every part-*.parquet in OUTPUT must be one this "
                       "tool wrote: move that file out of OUTPUT (or delete it if it is a stray "
                       "copy) and run the command again")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
