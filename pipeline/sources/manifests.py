"""Manifest INPUTs (.txt, .csv, .parquet): entries per row, and CSV/Parquet record batches as
columns (RefChunk) with no Python object per row."""
from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .. import inputs
from ..exitcodes import ConfigError
from ..flatstrings import flat_buffers
from ..idset import SeenIds
from ..types import NULL_INT, ImageRef, S3Options, printable, timestamps_ns
from .chunks import KnownIds, RefChunk, SourceStats
from .ids import path_id
from .s3listing import S3_STAT_CHUNK
from .walk import stat_values


def is_columnar(path: str) -> bool:
    return Path(path).suffix.lower() in (".csv", ".parquet")


MANIFEST_CHUNK = 1024  # manifest rows de-duplicated (and S3 paths stat'ed) together


def manifest_refs(path: Path, stats: SourceStats, s3: S3Options) -> Iterator[ImageRef]:
    """One ref per id (the first entry of an id wins; repeats are counted in stats.duplicates)."""
    seen = SeenIds()
    try:
        for chunk in _chunks(_manifest_entries(path), MANIFEST_CHUNK):
            first = seen.first_seen([entry[0] for entry in chunk])
            stats.duplicates += int(len(first) - first.sum())
            entries = [e for e, new in zip(chunk, first) if new]
            yield from (ref for ref, _ in _stat_entries(entries, s3))
    finally:
        seen.close()


def manifest_chunks(path: Path, stats: SourceStats, s3: S3Options,
                    known: KnownIds | None = None) -> Iterator[RefChunk]:
    """A CSV/Parquet manifest a record batch at a time, one ref per id (the first entry of an id
    wins). A batch whose ids and paths are plain (no blank, padded, escaped or NUL-containing
    value) is handled as columns; another goes entry by entry like a .txt manifest. Once
    `known` holds a lookup, the de-duplication uses it, and a columnar chunk carries its answer
    (RefChunk.found)."""
    seen = SeenIds()
    base = path.absolute().parent
    try:
        for batch, columns, where in _manifest_batches(path):
            if known is not None and known.lookup is not None and not seen.knows:
                seen.know(known.lookup)
            chunk = _columnar_chunk(batch, columns, base)
            if chunk is None:
                for entries in _chunks(_entries(_batch_rows(batch, *columns, where=where), path),
                                       MANIFEST_CHUNK):
                    first = seen.first_seen([entry[0] for entry in entries])
                    stats.duplicates += int(len(first) - first.sum())
                    kept = [e for e, new in zip(entries, first) if new]
                    yield RefChunk.of_refs([ref for ref, _ in _stat_entries(kept, s3)])
                continue
            first, chunk.found = seen.first_seen_found(chunk.ids)
            stats.duplicates += int(len(first) - first.sum())
            yield chunk if first.all() else chunk.take(np.flatnonzero(first))
    finally:
        seen.close()


TRUSTED_COLUMNS = ("size", "mtime")  # a manifest with both is not stat'ed (see README)
# Characters str.strip() removes: a value starting or ending with one goes entry by entry.
_EDGE_SPACE = r"^[\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}]|[\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}]$"


def _manifest_batches(path: Path) -> Iterator[tuple[Any, _Columns, tuple[str, int]]]:
    """(record batch, (path column, id column or None, None), where its first row is)."""
    if path.suffix.lower() == ".csv":
        line = 2  # of the first row after the header
        for batch, columns in _csv_batches(path, None):
            yield batch, columns, ("line", line)
            line += batch.num_rows
        return
    pf = _parquet_file(path)
    columns = _columns_or_error(pf.schema_arrow.names, path, None)
    row = 1
    wanted = [c for c in columns if c] + list(_trusted_columns(pf.schema_arrow, path))
    for batch in pf.iter_batches(batch_size=65536, columns=wanted):
        yield batch, columns, ("row", row)
        row += batch.num_rows


def _trusted_columns(schema, path: Path) -> tuple[str, ...]:
    """`size` and `mtime` if the manifest has both; ConfigError if they are of the wrong type."""
    import pyarrow as pa

    if not all(name in schema.names for name in TRUSTED_COLUMNS):
        return ()
    size, mtime = (schema.field(name).type for name in TRUSTED_COLUMNS)
    if not pa.types.is_integer(size) or not pa.types.is_timestamp(mtime):
        raise ConfigError(f"manifest {path}: its size column must hold integers (bytes) and its "
                          f"mtime column timestamps; they are {size} and {mtime}")
    return TRUSTED_COLUMNS


def _columnar_chunk(batch, columns: tuple, base: Path) -> RefChunk | None:
    """The batch as a RefChunk, or None if an id or path needs the per-entry rules or an
    s3:// path needs a stat."""
    import pyarrow as pa

    path_col, id_col, _ = columns
    try:
        paths = batch.column(path_col).cast(pa.string())
        ids = None if id_col is None else batch.column(id_col).cast(pa.string())
    except pa.ArrowInvalid:  # a binary column holding bytes that are not UTF-8
        return None
    if not _plain(paths) or _holds_byte(paths, 0):
        return None
    if ids is not None:
        if not _plain(ids):
            return None
    elif _holds_byte(paths, ord("\\")):  # path_id escapes a backslash
        return None
    else:
        ids = paths
    size, mtime_ns = _trusted_values(batch)
    unknown = np.flatnonzero((size == NULL_INT) | (mtime_ns == NULL_INT))
    if len(unknown):
        to_stat = [_resolve(raw, base) for raw in paths.take(pa.array(unknown)).to_pylist()]
        if any(inputs.is_remote(uri) for uri in to_stat):
            return None  # entry by entry, stat'ed in chunks: a whole batch is slow to start
        for i, uri in zip(unknown, to_stat):
            size[i], mtime_ns[i] = stat_values(uri)  # the uri's file

    def make_refs(rows: np.ndarray) -> list[ImageRef]:
        taken = pa.array(rows, pa.int64())
        return [ImageRef(image_id, _resolve(raw, base),
                         None if size[i] == NULL_INT else int(size[i]),
                         None if mtime_ns[i] == NULL_INT else int(mtime_ns[i]))
                for i, image_id, raw in zip(rows, ids.take(taken).to_pylist(),
                                            paths.take(taken).to_pylist())]

    return RefChunk(ids, size, mtime_ns, make_refs)


def _plain(values) -> bool:
    """No null, no empty value, nothing str.strip() would remove. What it removes is an ASCII
    byte up to 0x20 or a non-ASCII character, so only values whose first or last byte is one of
    those are matched against _EDGE_SPACE."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if values.null_count:
        return False
    offsets, data = flat_buffers(values)
    if len(offsets) < 2:
        return True
    if (offsets[1:] == offsets[:-1]).any():
        return False
    first, last = data[offsets[:-1]], data[offsets[1:] - 1]
    odd = np.flatnonzero((first <= 0x20) | (first >= 0x80) | (last <= 0x20) | (last >= 0x80))
    return not len(odd) or not pc.any(pc.match_substring_regex(
        values.take(pa.array(odd)), _EDGE_SPACE)).as_py()


def _holds_byte(values, byte: int) -> bool:
    offsets, data = flat_buffers(values)
    return bool(len(offsets)) and bool((data[offsets[0]:offsets[-1]] == byte).any())


def _trusted_values(batch) -> tuple[np.ndarray, np.ndarray]:
    """(size, mtime in ns) from the batch's size and mtime columns, NULL_INT where a row has
    none (or a negative size) or the manifest has no such columns."""
    import pyarrow as pa

    n = batch.num_rows
    if not all(name in batch.schema.names for name in TRUSTED_COLUMNS):
        return np.full(n, NULL_INT, np.int64), np.full(n, NULL_INT, np.int64)
    # safe=False: a uint64 above int64's range wraps to a negative size, which is unknown too
    size = batch.column("size").cast(pa.int64(), safe=False).fill_null(NULL_INT).to_numpy().copy()
    size[size < 0] = NULL_INT
    return size, timestamps_ns(batch.column("mtime"))  # an out-of-range mtime is unknown



def read_manifest(path: Path, extra_column: str | None = None,
                  s3: S3Options = S3Options()) -> Iterator[tuple[ImageRef, str | None]]:
    """Each listed image's ImageRef in file order (duplicates kept), with the row's value of
    `extra_column` (stripped; None when empty or not asked for). Relative paths resolve against
    the manifest's folder; a .csv/.parquet without `extra_column` is a ConfigError. An entry
    that names no file (an id with an empty path, a NUL byte) gives a ref with `entry_error`."""
    return _stat_entries(_manifest_entries(path, extra_column), s3)


# (image_id, path or s3:// URI, extra column's value, why the entry names no file or None)
Entry = tuple[str, str, str | None, str | None]


def _manifest_entries(path: Path, extra_column: str | None = None) -> Iterator[Entry]:
    """One entry per row that names something, the id as the ref will carry it: the row's id
    as written, else the path's id (`path_id`)."""
    suffix = path.suffix.lower()
    rows = {".txt": _txt_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}[suffix](path, extra_column)
    return _entries(rows, path, extra_column)


def _entries(rows: Iterable[Row], path: Path, extra_column: str | None = None) -> Iterator[Entry]:
    base = path.absolute().parent
    for image_id, raw_path, where, extra in rows:
        if not image_id and not raw_path:  # a blank row, unless its extra column says otherwise
            if extra:
                yield "", "", extra, (f"manifest {path.name} {where}: no path given "
                                      f"({extra_column} {extra!r})")
            continue
        image_id = printable(image_id) if image_id else path_id(raw_path or "")
        problem = _entry_problem(image_id, raw_path)
        if problem:
            yield image_id, path_id(raw_path or ""), extra, f"manifest {path.name} {where}: {problem}"
        else:
            yield image_id, _resolve(raw_path or "", base), extra, None


def _entry_problem(image_id: str, raw_path: str | None) -> str | None:
    if not raw_path:
        return f"no path given for id {image_id!r}"
    if "\0" in raw_path:
        return "the path contains a NUL byte, which no file name can"
    return None


def _stat_entries(entries: Iterable[Entry], s3: S3Options
                  ) -> Iterator[tuple[ImageRef, str | None]]:
    """Stat'ed in chunks: one round trip per S3 object is slow."""
    for chunk in _chunks(entries, S3_STAT_CHUNK):
        found = iter(inputs.stat_many([e[1] for e in chunk if not e[3]], s3))
        for image_id, resolved, extra, problem in chunk:
            if problem:  # nothing to stat: an error row (uri: the path as written, for people)
                yield ImageRef(image_id, resolved, None, None, entry_error=problem), extra
            else:
                yield next(found).ref(image_id), extra


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _resolve(raw_path: str, base: Path) -> str:
    """An s3:// path as it is; a local one absolute (relative to `base`), see absolute_path."""
    return inputs.resolve(raw_path, os.fspath(base))


# One manifest row: (id, path, where it is: "line 7" / "row 7", the extra column's value).
Row = tuple[str | None, str | None, str, str | None]


def _txt_rows(path: Path, extra_column: str | None) -> Iterator[Row]:
    if extra_column:
        raise ConfigError(f"manifest {path} is a .txt file, which has no {extra_column!r} column; "
                          f"use a .csv or .parquet manifest")
    # utf-8-sig: a BOM (Windows editors) is not part of the first path.
    # surrogateescape: a line that is not UTF-8 still names the file by its bytes.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield None, line, f"line {number}", None


# (path column, id column or None, extra column or None)
_Columns = tuple[str, str | None, str | None]


def _columns_or_error(names: Iterable[str], path: Path,
                      extra_column: str | None) -> _Columns:
    names = list(names)
    for needed in ("path", extra_column):
        if needed and needed not in names:
            raise ConfigError(f"manifest {path} needs a {needed!r} column; it has: {', '.join(names)}")
    return "path", ("id" if "id" in names else None), extra_column


def check_manifest(path: Path) -> None:
    """ConfigError naming the line of the first malformed row of a CSV manifest, wherever it
    is (one streamed pass, before anything runs). Other kinds are checked as they are read."""
    if is_columnar(str(path)) and not _is_regular(path):
        raise ConfigError(f"manifest {path} is not a regular file (a pipe?): a .csv or .parquet "
                          f"manifest is read more than once (checked, then listed); write it to "
                          f"a file first, or list the paths in a .txt manifest, which is read once")
    if path.suffix.lower() == ".csv":
        for _ in _csv_batches(path, None):
            pass
    elif path.suffix.lower() == ".parquet":
        _trusted_columns(_parquet_file(path).schema_arrow, path)


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return True  # missing or unreadable: the read says so


def _csv_batches(path: Path, extra_column: str | None) -> Iterator[tuple[Any, _Columns]]:
    """(batch, columns) of the CSV with the columns read as strings; a malformed row is a
    ConfigError naming its line (rows are numbered like lines while no quoted field spans lines)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if path.stat().st_size == 0:
        return
    bad: list = []

    def remember(row) -> str:
        bad.append(row)
        return "error"

    def open_reader(**options):
        return pacsv.open_csv(path, read_options=pacsv.ReadOptions(use_threads=False),
                              parse_options=pacsv.ParseOptions(invalid_row_handler=remember),
                              **options)

    try:
        names = open_reader().schema.names
        columns = _columns_or_error(names, path, extra_column)
        types = {name: pa.string() for name in columns if name}
        if all(name in names for name in TRUSTED_COLUMNS):
            # us, not ns: a date after 2262 parses, and is then unknown (see _trusted_values)
            types.update(size=pa.int64(), mtime=pa.timestamp("us", "UTC"))
        for batch in open_reader(convert_options=pacsv.ConvertOptions(column_types=types)):
            yield batch, columns
    except pa.ArrowInvalid as e:
        raise _csv_error(path, bad, e) from None


def _csv_error(path: Path, bad: list, error: Exception) -> ConfigError:
    if not bad:
        return ConfigError(f"manifest {path} is not a readable CSV: {error}")
    row = bad[-1]
    where = f"line {row.number}" if row.number and row.number > 0 else "a row"
    text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
    return ConfigError(f"manifest {path} {where} has {row.actual_columns} field(s) where the "
                       f"header has {row.expected_columns}: {text!r} (quote a value that "
                       f"contains a comma)")


def _csv_rows(path: Path, extra_column: str | None) -> Iterator[Row]:
    line = 2  # of the first row after the header
    for batch, columns in _csv_batches(path, extra_column):
        yield from _batch_rows(batch, *columns, where=("line", line))
        line += batch.num_rows


def _parquet_rows(path: Path, extra_column: str | None) -> Iterator[Row]:
    pf = _parquet_file(path)
    columns = _columns_or_error(pf.schema_arrow.names, path, extra_column)
    row = 1
    for batch in pf.iter_batches(batch_size=65536, columns=[c for c in columns if c]):
        yield from _batch_rows(batch, *columns, where=("row", row))
        row += batch.num_rows


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ConfigError(f"manifest {path} is not a readable Parquet file: {e}") from e
    _check_text_columns(pf.schema_arrow, path)
    return pf


def _check_text_columns(schema, path: Path) -> None:
    """The path and id columns must be values that have a text form (strings, or numbers as
    ids); a list, struct or map is a ConfigError naming the column."""
    import pyarrow as pa

    for name in ("path", "id"):
        if name in schema.names and pa.types.is_nested(schema.field(name).type):
            raise ConfigError(f"manifest {path}: its {name} column must hold strings; it is "
                              f"{schema.field(name).type}")


def _batch_rows(batch, path_col: str, id_col: str | None, extra_col: str | None,
                where: tuple[str, int]) -> Iterator[Row]:
    import pyarrow as pa

    def strings(column: str | None) -> list[str | None]:
        if column is None:
            return [None] * batch.num_rows
        try:
            return batch.column(column).cast("string").to_pylist()
        except pa.ArrowInvalid:  # binary, not UTF-8: a file name by its bytes, as in a .txt
            return [None if v is None else os.fsdecode(v) for v in batch.column(column).to_pylist()]

    unit, first = where
    for i, (image_id, p, extra) in enumerate(
            zip(strings(id_col), strings(path_col), strings(extra_col))):
        yield ((image_id or "").strip() or None, (p or "").strip() or None, f"{unit} {first + i}",
               (extra or "").strip() or None)
