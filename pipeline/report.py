"""`pipeline report OUTPUT -o report.html`: what a labeling output holds, on one offline page.

The current rows (one per image and model, by the latest-row rule) are read once, with only
the columns the page needs, into a DuckDB table on disk (report_current); everything shown is
an aggregate or a capped sample of it, each one query (labels, thumbnails, review queue, error
examples, duplicate groups), so memory does not grow with OUTPUT. Embeddings are read only for
the near-duplicate sample, one row group at a time. Thumbnails are made with
Pillow under the reader's limits (thumbnails.py); the page is rendered by report_page.py.
No TensorFlow is imported.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import atomic, store, thumbnails
from .report_current import SCORE_BINS, CurrentRows, current_rows
from .exitcodes import ConfigError
from .report_page import (Duplicates, ErrorExample, ErrorKind, Group, ModelSection, ModelTotals,
                          Page, RunRow, Tile, placeholder_src, render)
from .store import Store, layout
from .store.parts import check_part
from .types import ReadLimits, S3Options

log = logging.getLogger(__name__)

# What the page reads of every current row; the optional hash only where the parts have it.
CURRENT_COLUMNS = ["image_id", "model", "uri", "status", "error_kind", "error", "label", "score",
                   "labeled_at"]
HASH_COLUMN = "content_sha256"
EMBEDDING_COLUMN = "embedding"
THUMBNAIL_MODES = ("embed", "dir")
RUNS_SHOWN = 20
MANIFEST_LIMIT = 2**22  # bytes read of one run manifest
NOT_AVAILABLE_EMBEDDINGS = "not available: label with --embeddings"
PLACEHOLDER_TEXT = {"not_found": "missing", "too_large": "too large"}  # else "no preview"


@dataclass(frozen=True)
class ReportOptions:
    """What the page shows and how much of it (every list is capped)."""

    thumbnails: str = "embed"  # embed (data: URIs in the page) | dir (files beside the page)
    max_thumbnails: int = 400  # distinct images with a thumbnail; the rest get a placeholder
    thumbnail_size: int = 160  # longest side, pixels
    top_labels: int = 15  # bars in each model's chart
    sheet_labels: int = 8  # top labels with a contact sheet
    per_label: int = 6  # thumbnails per contact sheet
    review: int = 24  # lowest top-1 scores shown
    error_examples: int = 5  # per error kind
    duplicate_groups: int = 20  # per kind of duplicate
    group_size: int = 6  # thumbnails per duplicate group
    near_threshold: float = 0.7  # embedding cosine: copies 0.83-0.99, other photos <= 0.51
    near_sample: int = 5000  # images compared for near duplicates (all models together)
    max_models: int = 8  # models with a section of their own
    max_runs: int = 200  # newest run manifests read

    def __post_init__(self):
        if self.thumbnails not in THUMBNAIL_MODES:
            raise ConfigError(f"--thumbnails must be one of {', '.join(THUMBNAIL_MODES)}, "
                              f"not {self.thumbnails!r}")
        if not 0.0 < self.near_threshold <= 1.0:
            raise ConfigError(f"--near-threshold must be in (0, 1], not {self.near_threshold}")
        for name in ("max_thumbnails", "top_labels", "sheet_labels", "per_label", "review",
                     "error_examples", "duplicate_groups", "group_size", "near_sample",
                     "max_models", "max_runs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
        if not 16 <= self.thumbnail_size <= 1024:
            raise ConfigError("--thumbnail-size must be between 16 and 1024")


@dataclass(frozen=True)
class ReportSummary:
    path: str
    rows: int
    models: int
    thumbnails: int
    placeholders: int
    seconds: float

    def line(self) -> str:
        return (f"report of {self.rows:,} current rows ({self.models} model(s)), "
                f"{self.thumbnails} thumbnails, {self.placeholders} placeholders, "
                f"{self.seconds:.1f}s -> {self.path}")


def write_report(output: str, html_path: str, options: ReportOptions = ReportOptions(),
                 limits: ReadLimits = ReadLimits(), s3: S3Options = S3Options()) -> ReportSummary:
    """Read OUTPUT, write the page to `html_path` atomically (thumbnails beside it with
    options.thumbnails == "dir")."""
    started = time.monotonic()
    out = store.open_output(output, s3)
    out.require_existing()
    if os.path.isdir(html_path):
        raise ConfigError(f"-o {html_path} is a directory; name the HTML file to write "
                          f"(e.g. {os.path.join(html_path, 'report.html')})")
    files = [f.name for f in out.data_files()]
    present = _optional_columns(out, files)
    columns = CURRENT_COLUMNS + ([HASH_COLUMN] if HASH_COLUMN in present else [])
    with current_rows(out, files, columns) as current:
        page = _page(out, current, files, EMBEDDING_COLUMN in present, HASH_COLUMN in present,
                     options)
    uris = _thumbnail_uris(page, options.max_thumbnails)
    made = thumbnails.make_all(uris, options.thumbnail_size, limits, s3)
    image_src = _image_sources(made, html_path, options.thumbnails)
    atomic.write_bytes(html_path, render(page, image_src).encode("utf-8"))
    good = sum(t.jpeg is not None for t in made.values())
    return ReportSummary(html_path, page.rows, len(page.totals), good, len(made) - good,
                         time.monotonic() - started)


def _optional_columns(out: Store, files: list[str]) -> set[str]:
    """The optional columns (content hash, embedding) that some part holds."""
    found: set[str] = set()
    for f in files:
        part = check_part(out, f)
        found |= {HASH_COLUMN, EMBEDDING_COLUMN} & set(part.schema_arrow.names)
        part.close()
    return found


def _page(out: Store, current: CurrentRows, files: list[str], has_embeddings: bool,
          has_hash: bool, options: ReportOptions) -> Page:
    listed, manifests = _manifests(out, options.max_runs)
    models = current.models_by_size()
    shown = models[: options.max_models]
    sections = tuple(_model_section(current, m, options) for m in shown)
    near = (_near_duplicates(out, files, current, shown, has_hash, options) if has_embeddings
            else Duplicates(NOT_AVAILABLE_EMBEDDINGS, available=False))
    return Page(
        output=out.output,
        generated_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        rows=current.rows,
        totals=_totals(current, models, manifests),
        runs=tuple(_run_row(m) for m in manifests[-RUNS_SHOWN:][::-1]),
        runs_listed=listed, runs_read=len(manifests),
        sections=sections, models_not_shown=len(models) - len(shown),
        errors=_errors(current, options.error_examples),
        exact=_exact_duplicates(current, options) if has_hash else Duplicates(
            "not available: OUTPUT has no content_sha256 column (its parts were written "
            "before labeling recorded it)", available=False),
        near=near,
        notes=_cap_notes(options),
    )


def _cap_notes(options: ReportOptions) -> tuple[str, ...]:
    return (f"Capped: {options.max_thumbnails} thumbnails, {options.top_labels} labels per "
            f"chart, {options.sheet_labels} contact sheets of {options.per_label}, "
            f"{options.review} in the review queue, {options.error_examples} examples per "
            f"error kind, {options.duplicate_groups} duplicate groups of {options.group_size}.",)


# ---- totals and runs -------------------------------------------------------------------------

def _totals(current: CurrentRows, models: list[str], manifests: list[dict]) -> tuple[ModelTotals, ...]:
    by_status = current.status_counts()
    by_kind = current.kind_counts()
    totals = []
    for m in models:
        runs = [r for r in manifests if _manifest_model(r) == m]
        summaries = [r.get("summary", {}) for r in runs]
        totals.append(ModelTotals(
            model=m,
            images=sum(n for (model, _), n in by_status.items() if model == m),
            labeled=by_status.get((m, "ok"), 0),
            errors=by_status.get((m, "error"), 0),
            errors_by_kind=tuple(sorted(((k or "?", n) for (model, k), n in by_kind.items()
                                         if model == m), key=lambda p: (-p[1], p[0]))),
            runs=len(runs),
            labeled_in_runs=sum(int(s.get("labeled") or 0) for s in summaries),
            wall_seconds=sum(float(s.get("wall_seconds") or 0.0) for s in summaries),
        ))
    return tuple(totals)


def _manifests(out: Store, most: int) -> tuple[int, list[dict]]:
    """(how many run manifests OUTPUT has, the newest `most` of them, oldest first). A
    manifest that cannot be read is left out (the parts are what counts)."""
    names = [n for n in out.names(layout.RUNS) if layout.is_run_manifest(n)]
    read = []
    for name in names[len(names) - most:] if most else []:
        try:
            read.append(out.read_json(layout.join(layout.RUNS, name), MANIFEST_LIMIT))
        except (OSError, ValueError) as e:
            log.warning(f"run manifest {name} not read: {e}")
    return len(names), [m for m in read if isinstance(m, dict)]


def _manifest_model(manifest: dict) -> str | None:
    return (manifest.get("summary") or {}).get("model") or (manifest.get("model") or {}).get("name")


def _run_row(manifest: dict) -> RunRow:
    s = manifest.get("summary") or {}
    return RunRow(
        run_id=str(manifest.get("run_id") or s.get("run_id") or "?"),
        model=str(_manifest_model(manifest) or "?"),
        finished_at=str(manifest.get("finished_at") or "?"),
        labeled=int(s.get("labeled") or 0), errors=int(s.get("errors") or 0),
        skipped=int(s.get("skipped") or 0), wall_seconds=float(s.get("wall_seconds") or 0.0),
        images_per_second=float(s.get("images_per_second") or 0.0),
        exit_code=s.get("exit_code") if isinstance(s.get("exit_code"), int) else None)


# ---- one model: labels, scores, contact sheets, review queue ---------------------------------

def _model_section(current: CurrentRows, model: str, options: ReportOptions) -> ModelSection:
    counts = current.label_counts(model)
    labeled = sum(n for _, n in counts)
    if labeled == 0:
        return ModelSection(model, 0, (), 0, (0,) * SCORE_BINS, (), ())
    sheet_labels = [label for label, _ in counts[: options.sheet_labels]]
    samples = current.label_samples(model, sheet_labels, options.per_label)
    sheets = tuple(_contact_sheet(label, n, samples.get(label, []))
                   for label, n in counts[: options.sheet_labels])
    return ModelSection(
        model=model, labeled=labeled,
        top_labels=tuple(counts[: options.top_labels]),
        distinct_labels=len(counts),
        score_bins=current.score_bins(model), sheets=sheets,
        review=_review_queue(current, model, options.review))


def _contact_sheet(name: str, count: int, sample: list[dict]) -> Group:
    tiles = tuple(Tile(r["image_id"], r["uri"], f"{r['score'] or 0.0:.3f}") for r in sample)
    return Group(f"{name} ({count:,} images)", tiles, more=count - len(tiles))


def _review_queue(current: CurrentRows, model: str, most: int) -> tuple[Tile, ...]:
    if most == 0:
        return ()
    return tuple(Tile(r["image_id"], r["uri"], f"{r['score'] or 0.0:.3f} {r['label'] or '?'}")
                 for r in current.lowest_scores(model, most))


# ---- errors ----------------------------------------------------------------------------------

def _errors(current: CurrentRows, examples: int) -> tuple[ErrorKind, ...]:
    return tuple(ErrorKind(kind, n, tuple(
        ErrorExample(r["image_id"], r["model"], r["uri"], r["error"] or "")
        for r in rows[:examples])) for kind, n, rows in current.error_kinds(examples))


# ---- duplicates ------------------------------------------------------------------------------

def _exact_duplicates(current: CurrentRows, options: ReportOptions) -> Duplicates:
    """Images with the same bytes (content_sha256), over every model's rows."""
    groups_found, images, top = current.duplicate_hashes(options.duplicate_groups)
    note = (f"Images whose bytes are identical (same content_sha256): "
            f"{images:,} images in {groups_found:,} groups.")
    members = current.hash_members([h for h, _ in top])
    groups = []
    for digest, n in top:
        found = {m["image_id"]: m for m in members if m[HASH_COLUMN] == digest}  # one per image
        tiles = [Tile(m["image_id"], m["uri"], m["label"] or "")
                 for m in found.values()][: options.group_size]
        groups.append(Group(f"{n} images, sha256 {digest[:16]}…", tuple(tiles), n - len(tiles)))
    return Duplicates(note, tuple(groups), groups_found)


def _near_duplicates(out: Store, files: list[str], current: CurrentRows, models: list[str],
                     has_hash: bool, options: ReportOptions) -> Duplicates:
    """Images whose embeddings are closer than the threshold (within one model), among a sample
    read a row group at a time; pairs with identical bytes are left to the exact groups."""
    per_model = max(1, options.near_sample // max(1, len(models)))
    groups, compared, found = [], 0, 0
    for model in models:
        sample = _embedding_sample(out, files, current, model, per_model, has_hash)
        if sample is None:
            continue
        compared += sample.num_rows
        model_groups = _similar_groups(sample, options.near_threshold, has_hash)
        found += len(model_groups)
        groups += [(model, sample, rows, similarity) for rows, similarity in model_groups]
    if not compared:
        return Duplicates(NOT_AVAILABLE_EMBEDDINGS, available=False)
    groups.sort(key=lambda g: (-len(g[2]), -g[3], g[0]))
    shown = tuple(_near_group(*g, options.group_size) for g in groups[: options.duplicate_groups])
    note = (f"Images whose embeddings have cosine similarity >= {options.near_threshold} "
            f"(same model), not byte-identical, among {compared:,} images compared "
            f"(whole row groups sampled, at most {options.near_sample:,}).")
    return Duplicates(note, shown, found)


def _embedding_sample(out: Store, files: list[str], current: CurrentRows, model: str, most: int,
                      has_hash: bool) -> pa.Table | None:
    """Up to `most` current ok rows of one model with their embeddings, taken from whole row
    groups in a fixed pseudo-random order of the parts; None if none has an embedding."""
    wanted = ["image_id", "model", "labeled_at", "uri", EMBEDDING_COLUMN] + (
        [HASH_COLUMN] if has_hash else [])
    taken, n = [], 0
    for f in sorted(files, key=lambda f: hashlib.sha256(f.encode()).digest()):
        part = check_part(out, f)
        try:
            if EMBEDDING_COLUMN not in part.schema_arrow.names:
                continue
            columns = [c for c in wanted if c in part.schema_arrow.names]
            for group in range(part.num_row_groups):
                if n >= most:
                    break
                rows = _current_with_embedding(part.read_row_group(group, columns=columns),
                                               model, current)
                taken.append(rows.slice(0, most - n))
                n += min(rows.num_rows, most - n)
        finally:
            part.close()
        if n >= most:
            break
    if not n:
        return None
    return pa.concat_tables(taken, promote_options="default")


def _current_with_embedding(rows: pa.Table, model: str, current: CurrentRows) -> pa.Table:
    rows = rows.filter(pc.and_(pc.equal(rows["model"], model), pc.is_valid(rows[EMBEDDING_COLUMN])))
    if HASH_COLUMN not in rows.column_names:
        rows = rows.append_column(HASH_COLUMN, pa.nulls(rows.num_rows, pa.string()))
    return current.current_ok(rows, model)


def _similar_groups(sample: pa.Table, threshold: float, has_hash: bool,
                    block: int = 1024, most_pairs: int = 100_000) -> list[tuple[list[int], float]]:
    """Connected groups of rows whose embeddings' cosine >= threshold: (rows, best similarity).
    The similarity matrix is made a block of rows at a time; pairs are capped."""
    vectors = _unit_vectors(sample[EMBEDDING_COLUMN])
    digests = sample[HASH_COLUMN].to_pylist() if has_hash else [None] * sample.num_rows
    parent = list(range(len(vectors)))
    best: dict[int, float] = {}
    pairs = 0
    for start in range(0, len(vectors), block):
        sims = vectors[start:start + block] @ vectors.T
        for i, j in zip(*np.nonzero(sims >= threshold)):
            a, b = start + int(i), int(j)
            if b <= a or (digests[a] is not None and digests[a] == digests[b]):
                continue
            _union(parent, a, b)
            best[a] = max(best.get(a, 0.0), float(sims[i, j]))
            pairs += 1
            if pairs >= most_pairs:
                break
        if pairs >= most_pairs:
            break
    members: dict[int, list[int]] = {}
    for row in range(len(vectors)):
        members.setdefault(_find(parent, row), []).append(row)
    groups = [rows for rows in members.values() if len(rows) > 1]
    return [(rows, max(best.get(r, 0.0) for r in rows)) for rows in groups]


def _unit_vectors(column) -> np.ndarray:
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    vectors = flat.reshape(len(values), -1)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _union(parent: list[int], a: int, b: int) -> None:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)


def _near_group(model: str, table: pa.Table, rows: list[int], similarity: float,
                most: int) -> Group:
    picked = table.select(["image_id", "uri"]).take(pa.array(rows[:most])).to_pylist()
    tiles = tuple(Tile(r["image_id"], r["uri"], model) for r in picked)
    return Group(f"{len(rows)} images, cosine up to {similarity:.3f} ({model})", tiles,
                 len(rows) - len(tiles))


# ---- thumbnails ------------------------------------------------------------------------------

def _thumbnail_uris(page: Page, most: int) -> list[str]:
    """The first `most` distinct sources in page order."""
    tiles = [t for s in page.sections for g in s.sheets for t in g.tiles]
    tiles += [t for s in page.sections for t in s.review]
    tiles += [t for d in (page.exact, page.near) for g in d.groups for t in g.tiles]
    return list(dict.fromkeys(t.uri for t in tiles))[:most]


def _image_sources(made: dict[str, thumbnails.Thumbnail], html_path: str, mode: str):
    """uri -> (src, why there is no preview) for the page; in "dir" mode the thumbnails are
    written into <page name>_thumbnails/ beside the page first."""
    folder = os.path.splitext(os.path.basename(html_path))[0] + "_thumbnails"
    if mode == "dir" and any(t.jpeg for t in made.values()):
        os.makedirs(os.path.join(os.path.dirname(html_path) or ".", folder), exist_ok=True)
    sources = {}
    for uri, thumb in made.items():
        if thumb.jpeg is None:
            sources[uri] = (placeholder_src(PLACEHOLDER_TEXT.get(thumb.kind, "no preview")),
                            thumb.reason)
        elif mode == "dir":
            name = thumbnails.file_name(uri)
            atomic.write_bytes(os.path.join(os.path.dirname(html_path) or ".", folder, name),
                               thumb.jpeg)
            sources[uri] = (urllib.parse.quote(f"{folder}/{name}"), "")
        else:
            sources[uri] = ("data:image/jpeg;base64," + base64.b64encode(thumb.jpeg).decode(), "")
    capped = (placeholder_src("not shown"), "no thumbnail: --max-thumbnails reached")
    return lambda uri: sources.get(uri, capped)
