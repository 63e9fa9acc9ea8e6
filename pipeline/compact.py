"""`pipeline compact OUTPUT`: the latest row per (image_id, model), in large files, incrementally.

`label` commits small parts; `compact` turns them into **compacted files** (about 128 MB each,
or --part-size rows; sorted by image_id, row groups of at most 128k rows, so a lookup of one
image reads one row group). A compacted file holds one model and one identity (the file
metadata of the parts its rows came from), and after every compaction each (image_id, model)
has exactly one row in OUTPUT. A nightly compaction rewrites only (see `plan`):
- the parts `label` wrote since the last compaction;
- the compacted files holding a row those parts supersede (found by the files' image_id
  statistics, then the image_id column of only the row groups that may hold one);
- undersized compacted files once 4 of one size class (powers of 4 rows) have gathered, so the
  file count stays small while each row is rewritten only a few times.
`--full` rewrites everything. The latest rows come from one external sort (rowstream: buckets
of the key range spilled to disk), streamed into the new files: memory does not grow with OUTPUT.

Crash-safe, locally and on S3: the new files are written as hidden `_staged-` files under a
`_compact-<id>.json` marker; when all are durable the marker is committed (on S3 with a
conditional write, so a run that took the lock over cannot be overwritten) and the staged files
are swapped in (renamed; on S3 copied server-side), then the replaced files deleted (see
store.replace.Replacement). Every write is fenced (a run whose S3 lease was taken over
commits nothing, LeaseLost). A kill before the commit is rolled back at the next start; after it,
the swap is finished at the next start.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import doneindex, interrupts, rowstream, store
from .exitcodes import ConfigError
from .store import Store, layout
from .store.parts import check_part, open_part
from .store.replace import Replacement, recover, replacements
from .store.schema import EMBEDDING, part_schema
from .types import S3Options
from .writer import new_run_id

log = logging.getLogger(__name__)

COMPACTION_KEY = b"pipeline.compaction"
TARGET_FILE_BYTES = 128 * 2**20
MIN_FILE_ROWS, MAX_FILE_ROWS = 16_384, 8_000_000
ROW_GROUP_ROWS, ROW_GROUP_BYTES = 131_072, 32 * 2**20
TIER_BASE, TIER_FILES = 4, 4  # undersized files merge once 4 have rows within a factor of 4


@dataclass
class CompactSummary:
    output: str
    compaction_id: str
    parts_before: int = 0
    parts_after: int = 0
    rows_before: int = 0
    rows_after: int = 0
    files_rewritten: int = 0
    bytes_before: int = 0
    bytes_rewritten: int = 0
    bytes_written: int = 0
    message: str = ""

    def line(self) -> str:
        return (f"compacted {self.output}: {self.rows_before} -> {self.rows_after} rows, "
                f"{self.parts_before} -> {self.parts_after} parts; rewrote "
                f"{self.files_rewritten} file(s), {_mb(self.bytes_rewritten)} of "
                f"{_mb(self.bytes_before)}")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


@dataclass
class PartInfo:
    """What the plan needs of one file, from its footer."""

    path: str  # its name in OUTPUT
    rows: int
    bytes: int
    metadata: dict
    compacted: bool
    model: str | None
    id_ranges: list[tuple[str | None, str | None]] = field(default_factory=list)

    @property
    def group(self) -> tuple:
        """Rows of files with the same identity (file metadata but the version and the
        compaction, plus the embedding width) may share a compacted file."""
        return tuple(sorted((k, v) for k, v in self.metadata.items()
                            if k not in (b"pipeline.version", COMPACTION_KEY)))


def compact(output: str, part_size: int | None = None, full: bool = False,
            s3: S3Options = S3Options()) -> CompactSummary:
    """Compact OUTPUT (see the module doc); takes the output lock (OutputLocked if held).
    `part_size`: most rows per compacted file (default: about 128 MB of Parquet each)."""
    out = store.open_output(output, s3)
    out.require_existing()
    if not out.is_output():  # refused before the lock, which would leave a _lock behind
        raise ConfigError(f"{output} is not an OUTPUT of pipeline label (it holds no "
                          f"part-*.parquet, _runs/ or _lock); nothing to compact")
    if part_size is not None and part_size < 1:
        raise ConfigError(f"part_size must be a positive integer, got {part_size}")
    summary = CompactSummary(output, new_run_id())
    with interrupts.raised_on_signals(), out.lock("compact"):
        recover(out)
        if any(r.kind == "overwrite" for r in replacements(out)):
            raise ConfigError("an --overwrite run is unfinished in this output; run that label "
                              "command again to finish it, then compact")
        infos = [_part_info(out, f.name) for f in out.data_files()]
        summary.parts_before, summary.rows_before = len(infos), sum(i.rows for i in infos)
        summary.bytes_before = sum(i.bytes for i in infos)
        rewrite = plan(infos, part_size, full, out)
        if not rewrite:
            summary.parts_after, summary.rows_after = summary.parts_before, summary.rows_before
            summary.message = "nothing to compact: one row per image and model already"
            return summary
        new, rows = _rewrite(out, rewrite, part_size, summary.compaction_id)
        _follow_in_index(out, rewrite, new)
        summary.files_rewritten = len(rewrite)
        summary.bytes_rewritten = sum(i.bytes for i in rewrite)
        summary.bytes_written = sum(size for _, size in new)
        summary.parts_after = len(infos) - len(rewrite) + len(new)
        summary.rows_after = summary.rows_before - sum(i.rows for i in rewrite) + rows
        out.write_json(layout.run_manifest(summary.compaction_id),
                       {"kind": "compact", **asdict(summary)})
    return summary


def _follow_in_index(out: Store, rewrite: list[PartInfo], new: list[tuple[str, int]]) -> None:
    """The done index covers the compacted files (the compaction is done: a failure here
    costs the next run a rebuild, not this compaction)."""
    try:
        doneindex.follow_replacement(out, [i.path for i in rewrite], [name for name, _ in new])
    except OSError as e:
        log.warning(f"done index not updated after the compaction: {e}")


def _part_info(out: Store, path: str) -> PartInfo:
    with contextlib.closing(check_part(out, path)) as part:
        meta = dict(part.schema_arrow.metadata or {})
        if EMBEDDING in part.schema_arrow.names:
            meta[b"_embedding_width"] = str(part.schema_arrow.field(EMBEDDING).type.list_size).encode()
        md = part.metadata
        groups = [md.row_group(g) for g in range(md.num_row_groups)]
        stored = sum(g.column(c).total_compressed_size for g in groups for c in range(g.num_columns))
        info = PartInfo(path, md.num_rows, stored, meta,
                        COMPACTION_KEY in meta, (meta.get(b"pipeline.model") or b"").decode() or None)
        if info.compacted:
            info.id_ranges = [_id_range(g) for g in groups]
    return info


def _id_range(group) -> tuple[str | None, str | None]:
    stats = group.column(0).statistics  # image_id is the first column
    if stats is None or not stats.has_min_max:
        return None, None
    return stats.min, stats.max


# ---- which files to rewrite ------------------------------------------------------------------

def plan(infos: list[PartInfo], part_size: int | None, full: bool,
         out: Store | None = None) -> list[PartInfo]:
    """The files this compaction rewrites (see the module doc), in name order."""
    fresh = [i for i in infos if not i.compacted]
    compacted = [i for i in infos if i.compacted]
    if full:
        chosen = fresh + compacted
        one_per_group = len({i.group for i in chosen}) >= len(chosen)
        return [] if (not fresh and one_per_group) else sorted(chosen, key=lambda i: i.path)
    chosen = fresh + _superseded_by(fresh, compacted, out)
    chosen += _undersized_to_merge([i for i in compacted if i not in chosen], infos, part_size)
    if not fresh and len(chosen) < 2:
        return []  # one file alone is already what a rewrite would make
    return sorted(chosen, key=lambda i: i.path)


def _superseded_by(fresh: list[PartInfo], compacted: list[PartInfo],
                   out: Store | None) -> list[PartInfo]:
    """The compacted files holding an (image_id, model) that a fresh part has too. Memory:
    the fresh parts' keys (what changed since the last compaction)."""
    if not fresh or not compacted or out is None:
        return []
    keys = _keys(fresh, out)
    hit = []
    for info in compacted:
        ids = keys.get(info.model) if info.model else None
        if ids is None:
            ids = pa.concat_arrays(list(keys.values())) if keys else pa.array([], pa.string())
        if len(ids) and _holds_any(info, ids, out):
            hit.append(info)
    return hit


def _keys(fresh: list[PartInfo], out: Store) -> dict[str | None, pa.Array]:
    """The fresh parts' image_ids per model, sorted and distinct."""
    per_model: dict[str | None, list[pa.Array]] = {}
    for info in fresh:
        with open_part(out, info.path) as part:
            table = part.read(columns=["image_id", "model"])
        for model in table.column("model").unique().to_pylist():
            ids = table.filter(pc.equal(table.column("model"), model)).column("image_id")
            per_model.setdefault(model, []).extend(ids.chunks)
    return {m: pc.unique(pa.chunked_array(chunks, pa.string())).sort()
            for m, chunks in per_model.items()}


def _holds_any(info: PartInfo, ids: pa.Array, out: Store) -> bool:
    """Does the file hold one of the sorted `ids`? Only row groups whose image_id range can
    hold one are read (their image_id column alone)."""
    values = ids.to_pylist()  # sorted
    candidates = [group for group, (low, high) in enumerate(info.id_ranges)
                  if low is None or high is None
                  or bisect.bisect_right(values, high) > bisect.bisect_left(values, low)]
    if not candidates:
        return False
    with open_part(out, info.path) as part:
        for group in candidates:
            column = part.read_row_group(group, columns=["image_id"]).column("image_id")
            if pc.any(pc.is_in(column, value_set=ids)).as_py():
                return True
    return False


def _undersized_to_merge(compacted: list[PartInfo], infos: list[PartInfo],
                         part_size: int | None) -> list[PartInfo]:
    """Compacted files under half their group's file size, once TIER_FILES of one size class
    (floor(log4(rows))) have gathered in a group."""
    classes: dict[tuple, list[PartInfo]] = {}
    for info in compacted:
        if info.rows < file_rows(_group_bytes_per_row(info.group, infos), part_size) / 2:
            tier = int(math.log(max(info.rows, 1), TIER_BASE))
            classes.setdefault((info.group, tier), []).append(info)
    return [i for members in classes.values() if len(members) >= TIER_FILES for i in members]


def _group_bytes_per_row(group: tuple, infos: list[PartInfo]) -> float:
    members = [i for i in infos if i.group == group]
    return sum(i.bytes for i in members) / max(1, sum(i.rows for i in members))


def file_rows(bytes_per_row: float, part_size: int | None) -> int:
    """Rows per compacted file: about TARGET_FILE_BYTES of Parquet, or part_size."""
    if part_size is not None:
        return part_size
    return int(min(MAX_FILE_ROWS, max(MIN_FILE_ROWS, TARGET_FILE_BYTES / max(bytes_per_row, 1))))


# ---- writing the new files -------------------------------------------------------------------

def _rewrite(out: Store, rewrite: list[PartInfo], part_size: int | None,
             compaction_id: str) -> tuple[list[tuple[str, int]], int]:
    """Write the latest rows of `rewrite` as staged compacted files, then commit the swap.
    Returns ([(name, bytes)], rows written)."""
    rep = Replacement(out, "compact", compaction_id, None, [i.path for i in rewrite])
    rep.save()
    try:
        writers = _GroupWriters(out, rewrite, part_size, compaction_id)
        files = [i.path for i in rewrite]
        schema = rowstream.common_schema(out, files)
        for batch in rowstream.latest_sorted(out, files, schema, schema.names):
            writers.add(batch)
        new = writers.close()
    except BaseException as e:
        writers_abort(locals().get("writers"), e)
        rep.abandon()  # a kill here instead is rolled back at the next start
        raise
    rep.add = [name for name, _ in new]
    with interrupts.deferred():
        rep.commit()
    return new, writers.rows


def writers_abort(writers: _GroupWriters | None, e: BaseException) -> None:
    if writers is not None:
        for series in writers.groups:
            if series.file is not None:
                series.file.abort(e)


class _GroupWriters:
    """Rows (in image_id order) routed to their group's compacted file, cut every file_rows."""

    def __init__(self, output: Store, rewrite: list[PartInfo], part_size: int | None,
                 compaction_id: str):
        self.output, self.compaction_id = output, compaction_id
        groups = list(dict.fromkeys(i.group for i in rewrite))
        self.group_of = np.array([groups.index(i.group) for i in rewrite], np.int32)
        self.groups = [_FileSeries(self, [i for i in rewrite if i.group == g], part_size)
                       for g in groups]
        self.written: list[tuple[str, int]] = []
        self.rows = self.files = 0

    def add(self, batch: pa.RecordBatch) -> None:
        group = self.group_of[batch.column(rowstream.FILE).to_numpy()]
        for g in np.unique(group):
            rows = batch if len(self.groups) == 1 else batch.filter(pa.array(group == g))
            self.groups[g].add(rows)
        self.rows += batch.num_rows

    def next_name(self) -> str:
        self.files += 1
        return layout.part_name(self.compaction_id, self.files - 1)

    def close(self) -> list[tuple[str, int]]:
        for series in self.groups:
            series.close()
        return self.written


class _FileSeries:
    """One group's compacted files: its newest member's metadata, the output schema (a fixed
    embedding width, or none), row groups of about ROW_GROUP_BYTES."""

    def __init__(self, owner: _GroupWriters, members: list[PartInfo], part_size: int | None):
        self.owner = owner
        meta = dict(members[-1].metadata)
        width = meta.pop(b"_embedding_width", None)
        meta[COMPACTION_KEY] = owner.compaction_id.encode()
        self.schema = part_schema(int(width) if width else None).with_metadata(meta)
        per_row = sum(i.bytes for i in members) / max(1, sum(i.rows for i in members))
        self.file_rows = file_rows(per_row, part_size)
        self.group_rows = int(max(1, min(ROW_GROUP_ROWS, self.file_rows,
                                         ROW_GROUP_BYTES / max(per_row, 1))))
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.file: _StagedFile | None = None

    def add(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        while self.pending_rows >= self.group_rows:
            self._write_group(self.group_rows)

    def _write_group(self, n: int) -> None:
        table = pa.Table.from_batches(self.pending)
        if self.file is None:
            self.file = _StagedFile(self.owner, self.schema)
        n = min(n, self.file_rows - self.file.rows)
        self.file.write(self._conformed(table.slice(0, n)))
        rest = table.slice(n)
        self.pending, self.pending_rows = rest.to_batches(), rest.num_rows
        if self.file.rows >= self.file_rows:
            self.owner.written.append(self.file.close())
            self.file = None

    def _conformed(self, table: pa.Table) -> pa.Table:
        columns = [rowstream.as_embedding(table.column(f.name).combine_chunks(), f.type)
                   if f.name == EMBEDDING else table.column(f.name).cast(f.type)
                   for f in self.schema]
        return pa.Table.from_arrays(columns, schema=self.schema)

    def close(self) -> None:
        while self.pending_rows:
            self._write_group(self.pending_rows)
        if self.file is not None:
            self.owner.written.append(self.file.close())
            self.file = None


class _StagedFile:
    """A compacted file being written under its staged name (store.writing: locally a temp
    file renamed when complete, on S3 a temp file uploaded when complete, fenced either way)."""

    def __init__(self, owner: _GroupWriters, schema: pa.Schema):
        self.name = owner.next_name()
        self._stack = contextlib.ExitStack()
        self.local = self._stack.enter_context(owner.output.writing(layout.staged_name(self.name)))
        self.writer = pq.ParquetWriter(self.local, schema, compression="zstd",
                                       sorting_columns=[pq.SortingColumn(0)])
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=table.num_rows)
        self.rows += table.num_rows

    def close(self) -> tuple[str, int]:
        self.writer.close()
        size = os.path.getsize(self.local)
        self._stack.close()  # the staged file becomes visible (fenced), or raises
        return self.name, size

    def abort(self, e: BaseException) -> None:
        """Remove the temp file (the exception `e` passes through store.writing)."""
        with contextlib.suppress(BaseException):
            self.writer.close()
        with contextlib.suppress(BaseException):
            self._stack.__exit__(type(e), e, e.__traceback__)
