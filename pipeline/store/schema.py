"""The output contract's columns (DESIGN.md, "Output contract") and the check that a data
file in OUTPUT has them."""
from __future__ import annotations

import pyarrow as pa

SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_kind", pa.string()),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("file_size", pa.int64()),
    pa.field("mtime", pa.timestamp("us", tz="UTC")),
    pa.field("content_sha256", pa.string()),  # lowercase hex; null where no bytes were read
    pa.field("label_id", pa.string()),
    pa.field("label", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("label_ids", pa.list_(pa.string())),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("scores", pa.list_(pa.float32())),
    pa.field("model", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("labeled_at", pa.timestamp("us", tz="UTC"), nullable=False),
])

EMBEDDING = "embedding"  # only in parts of --embeddings runs, after every SCHEMA column
EMBEDDING_TYPE = pa.float16()

# Columns added to SCHEMA after parts were first written: a part without them is still ours
# (a reader fills them with nulls).
OPTIONAL_COLUMNS: frozenset[str] = frozenset({"content_sha256"})
# Columns a part may have beyond SCHEMA: with --embeddings, the pooled features (readers that
# need them check for them).
EXTRA_COLUMNS: frozenset[str] = frozenset({EMBEDDING})


def embedding_field(width: int) -> pa.Field:
    """The --embeddings column: the L2-normalized pooled features, `width` values per row."""
    return pa.field(EMBEDDING, pa.list_(EMBEDDING_TYPE, width))


def part_schema(embedding_width: int | None = None) -> pa.Schema:
    """A part's columns: SCHEMA, plus the embedding column in --embeddings runs."""
    return SCHEMA if embedding_width is None else SCHEMA.append(embedding_field(embedding_width))


def schema_problem(schema: pa.Schema) -> str | None:
    """What makes `schema` not one of our parts' (None if it is one)."""
    found = {f.name: f.type for f in schema}
    missing = [f.name for f in SCHEMA if f.name not in found and f.name not in OPTIONAL_COLUMNS]
    unexpected = sorted(set(found) - set(SCHEMA.names) - EXTRA_COLUMNS)
    wrong = [f"{f.name} is {found[f.name]}, not {f.type}" for f in SCHEMA
             if f.name in found and found[f.name] != f.type]
    embedding = found.get(EMBEDDING)
    if embedding is not None and not (pa.types.is_fixed_size_list(embedding)
                                      and embedding.value_type == EMBEDDING_TYPE):
        wrong.append(f"{EMBEDDING} is {embedding}, not a fixed-size list of {EMBEDDING_TYPE}")
    problems = ([f"missing column(s) {_some(missing)}"] if missing else []) + (
        [f"unexpected column(s) {_some(unexpected)}"] if unexpected else []) + wrong
    return "; ".join(problems) or None


def _some(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
