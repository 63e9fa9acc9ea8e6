"""Enumerate inputs as a stream of ImageRef: a directory walk or a txt/csv/parquet manifest."""
from __future__ import annotations

import itertools
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from . import inventory, storage
from .exitcodes import ConfigError
from .idset import SeenIds
from .types import NULL_INT, ImageRef, S3Options, printable

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff",
     ".heic", ".heif", ".avif"}
)
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")
MANIFEST_CHUNK = 1024  # manifest rows de-duplicated (and S3 paths stat'ed) together


@dataclass
class SourceStats:
    listed: int = 0
    ignored: int = 0  # non-image files, hidden files and hidden directories (not entered)
    duplicates: int = 0  # repeated manifest entries (one row each id)
    loops: int = 0  # directory symlink loops skipped


def path_id(name: str) -> str:
    """The image_id of a path (relative to INPUT, or as a manifest writes it): valid UTF-8 and
    one id per name. A backslash is written `\\\\`, a NUL `\\x00`, and each byte that is not
    UTF-8 `\\xNN`, so `caf\\xe9.jpg` (those 11 characters) and caf<byte E9>.jpg stay apart."""
    if "\\" not in name and "\0" not in name and (name.isascii() or _is_utf8(name)):
        return name
    out = []
    for ch in name:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\0":
            out.append("\\x00")
        elif "\udc80" <= ch <= "\udcff":  # surrogateescape: the undecodable byte 0x80..0xff
            out.append(f"\\x{ord(ch) - 0xdc00:02x}")
        elif "\ud800" <= ch <= "\udfff":  # a lone surrogate not from a file name
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_image_name(name: str) -> bool:
    """By extension, any case. `._photo.jpg` is the AppleDouble metadata macOS leaves beside
    photo.jpg on non-Mac disks and in zips: never an image, even when named as INPUT."""
    base = os.path.basename(name)
    return not base.startswith("._") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
    """A dotfile or dot-directory (`.thumbnails/`, `.DS_Store`, macOS `._photo.jpg`)."""
    return name.startswith(".")


def describe_input(path: str, s3: S3Options = S3Options()) -> str:
    """'directory', 'manifest', 'inventory', 'image' or raise ConfigError with what is wrong
    (for a CSV manifest: its first malformed row, wherever it is)."""
    kind = _input_kind(path, s3)
    if kind == "manifest":
        check_manifest(Path(path))
    return kind


def _input_kind(path: str, s3: S3Options) -> str:
    if inventory.is_manifest(path):
        inventory.read_manifest(path, s3)  # a wrong manifest is a usage error, OUTPUT untouched
        return "inventory"
    if storage.is_s3(path):
        return _describe_s3(path, s3)
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
    if kind == "manifest" and _columnar_manifest(input_path):
        return (ref for chunk in _counted_chunks(_manifest_chunks(Path(input_path), stats, s3),
                                                 stats) for ref in chunk.refs())
    return _counted(_refs(input_path, kind, stats, inventory_prefix, s3), stats)


def _refs(input_path: str, kind: str, stats: SourceStats, inventory_prefix: str,
          s3: S3Options) -> Iterator[ImageRef]:
    if kind == "inventory":
        return _inventory_refs(inventory.read_manifest(input_path, s3), inventory_prefix, stats,
                               s3)
    if storage.is_s3(input_path):
        return _s3_refs(input_path, kind, stats, s3)
    if kind == "directory":
        return _walk_directory(Path(input_path), stats)
    if kind == "manifest":
        return _read_manifest(Path(input_path), stats, s3)
    p = Path(input_path)
    return iter([local_ref(path_id(p.name), p)])


def _input_kind_for(input_path: str, inventory_prefix: str, s3: S3Options) -> str:
    kind = describe_input(input_path, s3)
    if inventory_prefix and kind != "inventory":
        raise ConfigError("--inventory-prefix applies to an S3 Inventory INPUT (a manifest.json)")
    return kind


def _columnar_manifest(input_path: str) -> bool:
    return Path(input_path).suffix.lower() in (".csv", ".parquet")


def iter_chunks(input_path: str, stats: SourceStats | None = None, inventory_prefix: str = "",
                s3: S3Options = S3Options(), stop: Callable[[], bool] = lambda: False
                ) -> Iterator[RefChunk]:
    """`iter_refs` as RefChunks: a CSV/Parquet manifest a record batch at a time, with no Python
    object per entry until `RefChunk.refs` (and no stat when it has size and mtime columns);
    other listings in chunks of 1, 2, 4, ... 1024 refs, so a slow listing does not hold back
    the first image. `stop()` is asked between two refs, and ends the stream when true."""
    stats = stats if stats is not None else SourceStats()
    kind = _input_kind_for(input_path, inventory_prefix, s3)
    if kind == "manifest" and _columnar_manifest(input_path):
        return _counted_chunks(_manifest_chunks(Path(input_path), stats, s3), stats)
    refs = _counted(_refs(input_path, kind, stats, inventory_prefix, s3), stats)
    return (RefChunk.of_refs(chunk) for chunk in _growing_chunks(refs, stop))


class RefChunk:
    """Listed images as columns (what the done set checks a whole chunk at a time): image_id,
    file_size and mtime in ns (types.NULL_INT where unknown); the ImageRefs are made only for
    the rows asked for."""

    def __init__(self, ids, size: np.ndarray, mtime_ns: np.ndarray,
                 make_refs: Callable[[np.ndarray], list[ImageRef]]):
        self.ids, self.size, self.mtime_ns = ids, size, mtime_ns  # ids: pyarrow string array
        self._make_refs = make_refs

    def __len__(self) -> int:
        return len(self.size)

    @classmethod
    def of_refs(cls, refs: list[ImageRef]) -> "RefChunk":
        import pyarrow as pa

        return cls(pa.array([r.image_id for r in refs], pa.string()),
                   np.array([NULL_INT if r.file_size is None else r.file_size for r in refs],
                            np.int64),
                   np.array([NULL_INT if r.mtime_ns is None else r.mtime_ns for r in refs],
                            np.int64),
                   lambda rows: [refs[i] for i in rows])

    def refs(self, rows: np.ndarray | None = None) -> list[ImageRef]:
        return self._make_refs(np.arange(len(self)) if rows is None else rows)

    def take(self, rows: np.ndarray) -> "RefChunk":
        import pyarrow as pa

        rows = np.asarray(rows, np.int64)
        return RefChunk(self.ids.take(pa.array(rows)), self.size[rows], self.mtime_ns[rows],
                        lambda r: self._make_refs(rows[r]))


def _growing_chunks(refs: Iterator[ImageRef], stop: Callable[[], bool],
                    largest: int = 1024) -> Iterator[list[ImageRef]]:
    chunk, size = [], 1
    for ref in refs:
        if stop():
            return
        chunk.append(ref)
        if len(chunk) >= size:
            yield chunk
            chunk, size = [], min(size * 2, largest)
    if chunk:
        yield chunk


def _counted_chunks(chunks: Iterator[RefChunk], stats: SourceStats) -> Iterator[RefChunk]:
    for chunk in chunks:
        if len(chunk):
            stats.listed += len(chunk)
            yield chunk


def _counted(refs: Iterator[ImageRef], stats: SourceStats) -> Iterator[ImageRef]:
    for ref in refs:
        stats.listed += 1
        yield ref


def local_ref(image_id: str, path: Path) -> ImageRef:
    """`image_id` as given (a path's id comes from `path_id`). The reader opens only regular
    files (or symlinks to them): reading a FIFO blocks forever and /dev/zero never ends, so
    anything else gets file_size None and an error row."""
    image_id = printable(image_id)  # already valid UTF-8 unless a caller passed a raw name
    try:
        st = path.stat()
    except (OSError, ValueError):  # ValueError: a NUL byte (callers refuse it before)
        return ImageRef(image_id, os.path.abspath(path), None, None)
    size = st.st_size if stat.S_ISREG(st.st_mode) else None
    return ImageRef(image_id, os.path.abspath(path), size, st.st_mtime_ns)


def _walk_directory(root: Path, stats: SourceStats) -> Iterator[ImageRef]:
    """Depth-first, sorted, following directory symlinks once (loops are skipped)."""
    root_abs = Path(os.path.abspath(root))
    visited: set[tuple[int, int]] = set()

    def walk(directory: Path) -> Iterator[ImageRef]:
        try:
            st = directory.stat()
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        if key in visited:
            stats.loops += 1
            return
        visited.add(key)
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            path = Path(entry.path)
            if is_hidden(entry.name):
                stats.ignored += 1
            elif _is_dir(entry):
                yield from walk(path)
            elif is_image_name(entry.name):
                yield local_ref(path_id(path.relative_to(root_abs).as_posix()), path)
            else:
                stats.ignored += 1

    yield from walk(root_abs)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _read_manifest(path: Path, stats: SourceStats, s3: S3Options) -> Iterator[ImageRef]:
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


def _manifest_chunks(path: Path, stats: SourceStats, s3: S3Options) -> Iterator[RefChunk]:
    """A CSV/Parquet manifest a record batch at a time, one ref per id (the first entry of an id
    wins). A batch whose ids and paths are plain (no blank, padded, escaped or NUL-containing
    value) is handled as columns; another goes entry by entry like a .txt manifest."""
    seen = SeenIds()
    base = path.absolute().parent
    try:
        for batch, columns, where in _manifest_batches(path):
            chunk = _columnar_chunk(batch, columns, base)
            if chunk is None:
                for entries in _chunks(_entries(_batch_rows(batch, *columns, where=where), path),
                                       MANIFEST_CHUNK):
                    first = seen.first_seen([entry[0] for entry in entries])
                    stats.duplicates += int(len(first) - first.sum())
                    kept = [e for e, new in zip(entries, first) if new]
                    yield RefChunk.of_refs([ref for ref, _ in _stat_entries(kept, s3)])
                continue
            first = seen.first_seen_arrow(chunk.ids)
            stats.duplicates += int(len(first) - first.sum())
            yield chunk if first.all() else chunk.take(np.flatnonzero(first))
    finally:
        seen.close()


TRUSTED_COLUMNS = ("size", "mtime")  # a manifest with both is not stat'ed (see README)
# Characters str.strip() removes: a value starting or ending with one goes entry by entry.
_EDGE_SPACE = r"^[\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}]|[\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}]$"


def _manifest_batches(path: Path):
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
    import pyarrow.compute as pc

    path_col, id_col, _ = columns
    paths = batch.column(path_col).cast(pa.string())
    if not _plain(paths) or pc.any(pc.match_substring(paths, "\0")).as_py():
        return None
    if id_col is not None:
        ids = batch.column(id_col).cast(pa.string())
        if not _plain(ids):
            return None
    elif pc.any(pc.match_substring(paths, "\\")).as_py():  # path_id escapes a backslash
        return None
    else:
        ids = paths
    size, mtime_ns = _trusted_values(batch)
    unknown = np.flatnonzero((size == NULL_INT) | (mtime_ns == NULL_INT))
    if len(unknown):
        to_stat = paths.take(pa.array(unknown)).to_pylist()
        if any(storage.is_s3(p) for p in to_stat):
            return None
        for i, raw in zip(unknown, to_stat):
            size[i], mtime_ns[i] = _stat_values(_resolve(raw, base))

    def make_refs(rows: np.ndarray) -> list[ImageRef]:
        taken = pa.array(rows, pa.int64())
        return [ImageRef(image_id, raw if storage.is_s3(raw) else os.path.abspath(_resolve(raw, base)),
                         None if size[i] == NULL_INT else int(size[i]),
                         None if mtime_ns[i] == NULL_INT else int(mtime_ns[i]))
                for i, image_id, raw in zip(rows, ids.take(taken).to_pylist(),
                                            paths.take(taken).to_pylist())]

    return RefChunk(ids, size, mtime_ns, make_refs)


def _plain(values) -> bool:
    """No null, no empty value, nothing str.strip() would remove."""
    import pyarrow.compute as pc

    return values.null_count == 0 and not pc.any(pc.equal(pc.binary_length(values), 0)).as_py() \
        and not pc.any(pc.match_substring_regex(values, _EDGE_SPACE)).as_py()


def _trusted_values(batch) -> tuple[np.ndarray, np.ndarray]:
    """(size, mtime in ns) from the batch's size and mtime columns, NULL_INT where a row has
    none (or a negative size) or the manifest has no such columns."""
    import pyarrow as pa

    n = batch.num_rows
    if not all(name in batch.schema.names for name in TRUSTED_COLUMNS):
        return np.full(n, NULL_INT, np.int64), np.full(n, NULL_INT, np.int64)
    size = batch.column("size").cast(pa.int64()).fill_null(NULL_INT).to_numpy().copy()
    size[size < 0] = NULL_INT
    mtime = batch.column("mtime")
    mtime = mtime.cast(pa.timestamp("ns", mtime.type.tz)).cast(pa.int64())
    return size, mtime.fill_null(NULL_INT).to_numpy().copy()


def _stat_values(path: str) -> tuple[int, int]:
    """(size, mtime_ns) as local_ref finds them, NULL_INT for None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return NULL_INT, NULL_INT
    return (st.st_size if stat.S_ISREG(st.st_mode) else NULL_INT), st.st_mtime_ns


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
        image_id = printable(image_id) if image_id else path_id(raw_path)
        problem = _entry_problem(image_id, raw_path)
        if problem:
            yield image_id, path_id(raw_path or ""), extra, f"manifest {path.name} {where}: {problem}"
        else:
            yield image_id, _resolve(raw_path, base), extra, None


def _entry_problem(image_id: str, raw_path: str | None) -> str | None:
    if not raw_path:
        return f"no path given for id {image_id!r}"
    if "\0" in raw_path:
        return "the path contains a NUL byte, which no file name can"
    return None


def _stat_entries(entries: Iterable[Entry], s3: S3Options
                  ) -> Iterator[tuple[ImageRef, str | None]]:
    s3_rows: list[tuple[str, str]] = []
    s3_extras: list[str | None] = []
    for image_id, resolved, extra, problem in entries:
        if problem:  # nothing to stat: an error row (uri: the path as written, for people)
            yield ImageRef(image_id, resolved, None, None, entry_error=problem), extra
        elif storage.is_s3(resolved):  # stat'ed in chunks: one round trip per object is slow
            s3_rows.append((image_id, resolved))
            s3_extras.append(extra)
            if len(s3_rows) >= S3_STAT_CHUNK:
                yield from zip(_s3_stat(s3_rows, s3), s3_extras)
                s3_rows, s3_extras = [], []
        else:
            yield local_ref(image_id, Path(resolved)), extra
    yield from zip(_s3_stat(s3_rows, s3), s3_extras)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _resolve(raw_path: str, base: Path) -> str:
    if raw_path.startswith("s3://") or os.path.isabs(raw_path):
        return raw_path
    return str(base / raw_path)


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


def _columns_or_error(names: Iterable[str], path: Path,
                      extra_column: str | None) -> tuple[str, str | None, str | None]:
    names = list(names)
    for needed in ("path", extra_column):
        if needed and needed not in names:
            raise ConfigError(f"manifest {path} needs a {needed!r} column; it has: {', '.join(names)}")
    return "path", ("id" if "id" in names else None), extra_column


def check_manifest(path: Path) -> None:
    """ConfigError naming the line of the first malformed row of a CSV manifest, wherever it
    is (one streamed pass, before anything runs). Other kinds are checked as they are read."""
    if path.suffix.lower() == ".csv":
        for _ in _csv_batches(path, None):
            pass
    elif path.suffix.lower() == ".parquet":
        _trusted_columns(_parquet_file(path).schema_arrow, path)


def _csv_batches(path: Path, extra_column: str | None):
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
            types.update(size=pa.int64(), mtime=pa.timestamp("ns", "UTC"))
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
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ConfigError(f"manifest {path} is not a readable Parquet file: {e}") from e


def _batch_rows(batch, path_col: str, id_col: str | None, extra_col: str | None,
                where: tuple[str, int]) -> Iterator[Row]:
    def strings(column: str | None) -> list[str | None]:
        if column is None:
            return [None] * batch.num_rows
        return batch.column(column).cast("string").to_pylist()

    unit, first = where
    for i, (image_id, p, extra) in enumerate(
            zip(strings(id_col), strings(path_col), strings(extra_col))):
        yield ((image_id or "").strip() or None, (p or "").strip() or None, f"{unit} {first + i}",
               (extra or "").strip() or None)


# -- S3 ----------------------------------------------------------------------------------------

S3_STAT_CHUNK = 256


def _describe_s3(uri: str, s3: S3Options) -> str:
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


def _s3_refs(uri: str, kind: str, stats: SourceStats, s3: S3Options) -> Iterator[ImageRef]:
    if kind == "image":
        return _s3_stat([(path_id(uri.rsplit("/", 1)[-1]), uri)], s3)
    return _listed_refs(uri, stats, s3)


def _listed_refs(uri: str, stats: SourceStats, s3: S3Options) -> Iterator[ImageRef]:
    """A prefix, page by page (ListObjectsV2): labeling starts after the first page."""
    bucket, prefix = storage.split(uri)[0], storage.key_prefix(uri)
    for key, size, mtime_ns in storage.iter_objects(uri, s3):
        ref = _object_ref(bucket, key, key[len(prefix):], size, mtime_ns, stats)
        if ref is not None:
            yield ref


def _inventory_refs(inv: inventory.Inventory, prefix: str, stats: SourceStats, s3: S3Options
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


def _s3_stat(rows: list[tuple[str, str]], s3: S3Options) -> Iterator[ImageRef]:
    if not rows:
        return iter(())
    infos = storage.filesystem(s3).get_file_info([storage.fs_path(u) for _, u in rows])
    return iter([_s3_ref(image_id, info) for (image_id, _), info in zip(rows, infos)])
