"""`pipeline compact OUTPUT`: rewrite the parts keeping only the latest row per (image_id, model).

Crash-safe: the new parts are written as hidden staged files under a `_compact-<id>.json`
marker; only when all are durable is the marker committed and the swap done (see
store/replace.py). A kill before that leaves the old parts untouched (rolled back at the
next start); a kill during the swap is finished at the next start.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import interrupts, store
from .exitcodes import ConfigError
from .store import Store, layout
from .store.latest import latest_rows
from .store.parts import open_part
from .store.replace import Replacement, recover, replacements
from .store.schema import EMBEDDING, EMBEDDING_TYPE, SCHEMA, part_schema
from .writer import conform, new_run_id, write_part

# Rows of every part side by side: embeddings of any width (or none) as a variable-size list
_READ_SCHEMA = SCHEMA.append(pa.field(EMBEDDING, pa.list_(EMBEDDING_TYPE)))


@dataclass
class CompactSummary:
    output: str
    compaction_id: str
    parts_before: int = 0
    parts_after: int = 0
    rows_before: int = 0
    rows_after: int = 0
    message: str = ""

    def line(self) -> str:
        return (f"compacted {self.output}: {self.rows_before} -> {self.rows_after} rows, "
                f"{self.parts_before} -> {self.parts_after} parts")


def compact(output: str, part_size: int = 4096) -> CompactSummary:
    """Keep the latest row per (image_id, model); takes the output lock (OutputLocked if held)."""
    if output.startswith("s3://"):
        raise ConfigError("compact works on a local OUTPUT only (S3 has no rename to swap parts "
                          "in); copy the prefix down, compact, and upload it")
    out = store.open_output(output)
    out.require_existing()
    if part_size < 1:
        raise ConfigError(f"part_size must be a positive integer, got {part_size}")
    summary = CompactSummary(output, new_run_id())
    with interrupts.raised_on_signals(), out.lock("compact"):
        recover(out)
        if any(r.kind == "overwrite" for r in replacements(out)):
            raise ConfigError("an --overwrite run is unfinished in this output; run that label "
                              "command again to finish it, then compact")
        old = [f.name for f in out.data_files()]
        table, metadata = _read_parts(out, old)
        kept = table.take(np.sort(latest_rows(table).to_numpy()))
        new = _new_parts(kept, metadata, part_size, summary.compaction_id)
        summary.parts_before, summary.rows_before = len(old), table.num_rows
        summary.parts_after, summary.rows_after = len(new), kept.num_rows
        if kept.num_rows == table.num_rows and len(new) >= len(old):
            summary.parts_after = len(old)
            summary.message = "nothing to compact: one row per image and model already"
            return summary
        _replace(out, old, new, summary.compaction_id)
        out.write_json(layout.run_manifest(summary.compaction_id),
                       {"kind": "compact", **asdict(summary)})
    return summary


def _read_parts(out: Store, names: list[str]) -> tuple[pa.Table, list[dict]]:
    """All rows, with `_part` (index into names) so rows can go back to their part's metadata
    (and its embedding width, kept in the metadata as `_embedding_width`)."""
    tables, metadata = [], []
    for i, name in enumerate(names):
        with open_part(out, name) as part:
            t = part.read()
        meta = dict(t.schema.metadata or {})
        if EMBEDDING in t.schema.names:
            meta[b"_embedding_width"] = str(t.schema.field(EMBEDDING).type.list_size).encode()
        metadata.append(meta)
        # drops file metadata, so the tables concatenate; older parts get null content_sha256
        t = conform(t, _READ_SCHEMA)
        tables.append(t.append_column("_part", pa.array(np.full(t.num_rows, i, np.int32))))
    if not tables:
        return _READ_SCHEMA.empty_table().append_column("_part", pa.array([], pa.int32())), []
    return pa.concat_tables(tables), metadata


def _new_parts(kept: pa.Table, metadata: list[dict], part_size: int,
               compaction_id: str) -> list[tuple[str, pa.Table]]:
    """Rows grouped by their part's file metadata (model, weights, top_k ...), sorted, cut."""
    groups: dict[tuple, list[int]] = {}
    for i, meta in enumerate(metadata):
        key = tuple(sorted((k, v) for k, v in meta.items() if k != b"pipeline.version"))
        groups.setdefault(key, []).append(i)
    out: list[tuple[str, pa.Table]] = []
    for members in groups.values():
        rows = kept.filter(pc.is_in(kept.column("_part"), pa.array(members, pa.int32())))
        rows = rows.drop_columns(["_part"]).sort_by([("model", "ascending"), ("image_id", "ascending")])
        meta = {**metadata[members[-1]], b"pipeline.compaction": compaction_id.encode()}
        width = meta.pop(b"_embedding_width", None)
        schema = part_schema(int(width) if width else None).with_metadata(meta)
        rows = rows.select(schema.names)
        for start in range(0, rows.num_rows, part_size):
            name = layout.part_name(compaction_id, len(out))
            out.append((name, rows.slice(start, part_size).cast(schema)))
    return out


def _replace(out: Store, old: list[str], new: list[tuple[str, pa.Table]], compaction_id: str) -> None:
    rep = Replacement(out, "compact", compaction_id, None, old, [name for name, _ in new])
    rep.save()
    try:
        for name, table in new:
            write_part(out, layout.staged_name(name), table)
    except BaseException:
        rep.abandon()  # a kill here instead is rolled back at the next start
        raise
    with interrupts.deferred():
        rep.commit()
