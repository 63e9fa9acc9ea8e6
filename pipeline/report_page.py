"""The report's content as plain values, and its rendering to one self-contained HTML page.

No JavaScript, no external resource: styles are inline, charts are hand-written SVG, images are
data: URIs or files beside the page. Every string that comes from data (image ids, URIs,
labels, error messages, model names) goes through `_e` (HTML escaping) exactly once, where it
is put into the page.
"""
from __future__ import annotations

import html
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable

# ---- content ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One image shown as a thumbnail with a caption."""

    image_id: str
    uri: str
    caption: str  # e.g. the score and label; the image_id is always shown under it


@dataclass(frozen=True)
class Group:
    title: str
    tiles: tuple[Tile, ...]
    more: int = 0  # members not shown (cap)


@dataclass(frozen=True)
class ModelTotals:
    model: str
    images: int  # current rows
    labeled: int
    errors: int
    errors_by_kind: tuple[tuple[str, int], ...]
    runs: int  # manifests of this model among those read
    labeled_in_runs: int
    wall_seconds: float

    @property
    def images_per_second(self) -> float | None:
        return self.labeled_in_runs / self.wall_seconds if self.wall_seconds > 0 else None


@dataclass(frozen=True)
class RunRow:
    run_id: str
    model: str
    finished_at: str
    labeled: int
    errors: int
    skipped: int
    wall_seconds: float
    images_per_second: float
    exit_code: int | None


@dataclass(frozen=True)
class ModelSection:
    model: str
    labeled: int
    top_labels: tuple[tuple[str, int], ...]
    distinct_labels: int
    score_bins: tuple[int, ...]  # equal-width bins over [0, 1]
    sheets: tuple[Group, ...]
    review: tuple[Tile, ...]


@dataclass(frozen=True)
class ErrorExample:
    image_id: str
    model: str
    uri: str
    message: str


@dataclass(frozen=True)
class ErrorKind:
    kind: str
    count: int
    examples: tuple[ErrorExample, ...]


@dataclass(frozen=True)
class Duplicates:
    note: str  # what the groups are, or why there are none ("not available: ...")
    groups: tuple[Group, ...] = ()
    total_groups: int = 0
    available: bool = True


@dataclass(frozen=True)
class Page:
    output: str
    generated_at: str
    rows: int
    totals: tuple[ModelTotals, ...]
    runs: tuple[RunRow, ...]
    runs_listed: int
    runs_read: int
    sections: tuple[ModelSection, ...]
    models_not_shown: int
    errors: tuple[ErrorKind, ...]
    exact: Duplicates
    near: Duplicates
    notes: tuple[str, ...] = field(default_factory=tuple)


# Where a tile's image comes from: uri -> (src for <img>, title: why there is no preview or "")
ImageSource = Callable[[str], "tuple[str, str]"]


# ---- rendering -------------------------------------------------------------------------------

def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def render(page: Page, image_src: ImageSource) -> str:
    body = "\n".join([
        _header(page),
        _totals(page),
        _runs(page),
        *(_model_section(s, image_src) for s in page.sections),
        _errors(page),
        _duplicates("exact-duplicates", "Exact duplicates", page.exact, image_src),
        _duplicates("near-duplicates", "Near duplicates", page.near, image_src),
    ])
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_e(CSP)}\">\n"
            f"<link rel=\"icon\" href=\"data:,\">\n"
            f"<title>pipeline report: {_e(page.output)}</title>\n<style>{STYLE}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


# Nothing runs and nothing is fetched from elsewhere, even if a string escaped escaping.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data: file: 'self'"

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}td.n,th.n{text-align:right}th{background:#f3f3f3}
.tiles{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:168px;border:1px solid #ddd;padding:4px;background:#fafafa}
figure img{display:block;max-width:160px;max-height:160px;margin:auto}
figcaption{font-size:12px;overflow-wrap:anywhere}
.note{color:#555;font-style:italic}.mono{font-family:monospace;overflow-wrap:anywhere}
svg text{font:12px sans-serif;fill:#222}svg .bar{fill:#4a78b5}svg .axis{stroke:#888}
nav a{margin-right:1em}
"""


def _header(page: Page) -> str:
    nav = " ".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in (
        ("totals", "Totals"), ("runs", "Runs"), *((_model_anchor(s.model), s.model)
                                                  for s in page.sections),
        ("errors", "Errors"), ("exact-duplicates", "Exact duplicates"),
        ("near-duplicates", "Near duplicates")))
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in page.notes)
    return (f'<header data-section="header"><h1>pipeline report</h1>'
            f'<p>OUTPUT <span class="mono">{_e(page.output)}</span>, generated '
            f'{_e(page.generated_at)}: {page.rows:,} current rows (the latest row of each '
            f'image and model).</p>{notes}<nav>{nav}</nav></header>')


def _model_anchor(model: str) -> str:
    return "model-" + urllib.parse.quote(model, safe="")


def _totals(page: Page) -> str:
    rows = "".join(
        f"<tr><td>{_e(t.model)}</td><td class=n>{t.images:,}</td><td class=n>{t.labeled:,}</td>"
        f"<td class=n>{t.errors:,}</td><td>{_e(_kinds(t.errors_by_kind))}</td>"
        f"<td class=n>{t.runs:,}</td><td class=n>{_rate(t.images_per_second)}</td></tr>"
        for t in page.totals)
    return (f'<section id="totals" data-section="totals"><h2>Totals per model</h2>'
            f"<table><tr><th>model</th><th class=n>images</th><th class=n>labeled</th>"
            f"<th class=n>errors</th><th>errors by kind</th><th class=n>runs</th>"
            f"<th class=n>images/s (runs)</th></tr>{rows}</table>"
            + (f'<p class="note">{page.models_not_shown} more model(s) in the totals only.</p>'
               if page.models_not_shown else "") + "</section>")


def _kinds(kinds: tuple[tuple[str, int], ...]) -> str:
    return ", ".join(f"{k} {n:,}" for k, n in kinds) or "-"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _runs(page: Page) -> str:
    if not page.runs:
        return ('<section id="runs" data-section="runs"><h2>Runs</h2>'
                '<p class="note">No run manifests in OUTPUT/_runs.</p></section>')
    rows = "".join(
        f"<tr><td class=mono>{_e(r.run_id)}</td><td>{_e(r.model)}</td><td>{_e(r.finished_at)}</td>"
        f"<td class=n>{r.labeled:,}</td><td class=n>{r.errors:,}</td><td class=n>{r.skipped:,}</td>"
        f"<td class=n>{r.wall_seconds:,.1f}</td><td class=n>{r.images_per_second:,.1f}</td>"
        f"<td class=n>{_e('-' if r.exit_code is None else r.exit_code)}</td></tr>"
        for r in page.runs)
    read = (f" (the newest {page.runs_read:,} read)" if page.runs_read < page.runs_listed else "")
    return (f'<section id="runs" data-section="runs"><h2>Runs</h2>'
            f"<p>{page.runs_listed:,} run manifest(s){read}; the newest {len(page.runs)}:</p>"
            f"<table><tr><th>run_id</th><th>model</th><th>finished</th><th class=n>labeled</th>"
            f"<th class=n>errors</th><th class=n>skipped</th><th class=n>wall s</th>"
            f"<th class=n>images/s</th><th class=n>exit</th></tr>{rows}</table></section>")


def _model_section(s: ModelSection, image_src: ImageSource) -> str:
    if not s.labeled:
        inner = '<p class="note">No labeled image for this model.</p>'
    else:
        sheets = "".join(_group(g, image_src, "h4") for g in s.sheets)
        inner = (f'<div data-section="top-labels"><h3>Top labels</h3><p>{s.distinct_labels:,} '
                 f'distinct top-1 labels over {s.labeled:,} labeled images; the '
                 f'{len(s.top_labels)} most frequent:</p>{bar_chart(s.top_labels)}</div>'
                 f'<div data-section="scores"><h3>Top-1 score distribution</h3>'
                 f'{histogram(s.score_bins)}</div>'
                 f'<div data-section="contact-sheets"><h3>Contact sheets</h3>'
                 f'<p class="note">A sample of each top label\'s images (the same sample every '
                 f'time for the same OUTPUT).</p>{sheets}</div>'
                 f'<div data-section="review"><h3>Review queue: lowest top-1 scores</h3>'
                 f'{_tiles(s.review, image_src)}</div>')
    return (f'<section id="{_e(_model_anchor(s.model))}" data-section="model" '
            f'data-model="{_e(s.model)}"><h2>Model {_e(s.model)}</h2>{inner}</section>')


def _group(g: Group, image_src: ImageSource, level: str) -> str:
    more = f'<p class="note">and {g.more:,} more</p>' if g.more else ""
    return f"<{level}>{_e(g.title)}</{level}>{_tiles(g.tiles, image_src)}{more}"


def _tiles(tiles: tuple[Tile, ...], image_src: ImageSource) -> str:
    if not tiles:
        return '<p class="note">None.</p>'
    return '<div class="tiles">' + "".join(_tile(t, image_src) for t in tiles) + "</div>"


def _tile(t: Tile, image_src: ImageSource) -> str:
    src, why = image_src(t.uri)
    title = f"{t.uri}\n{why}" if why else t.uri
    placeholder = ' data-placeholder="1"' if why else ""
    return (f'<figure><img src="{_e(src)}" alt="{_e(t.image_id)}" title="{_e(title)}"'
            f'{placeholder}><figcaption><b>{_e(t.caption)}</b><br>'
            f'<span class="mono">{_e(t.image_id)}</span></figcaption></figure>')


def _errors(page: Page) -> str:
    if not page.errors:
        return ('<section id="errors" data-section="errors"><h2>Errors</h2>'
                '<p class="note">No error rows.</p></section>')
    parts = []
    for kind in page.errors:
        rows = "".join(f"<tr><td class=mono>{_e(x.image_id)}</td><td>{_e(x.model)}</td>"
                       f"<td class=mono>{_e(x.uri)}</td><td>{_e(x.message)}</td></tr>"
                       for x in kind.examples)
        parts.append(f"<h3>{_e(kind.kind)}: {kind.count:,}</h3><table><tr><th>image_id</th>"
                     f"<th>model</th><th>uri</th><th>error</th></tr>{rows}</table>")
    return ('<section id="errors" data-section="errors"><h2>Errors</h2>'
            "<p>Current error rows by kind, with examples.</p>" + "".join(parts) + "</section>")


def _duplicates(anchor: str, title: str, d: Duplicates, image_src: ImageSource) -> str:
    groups = "".join(_group(g, image_src, "h3") for g in d.groups)
    shown = (f"<p>{d.total_groups:,} group(s); the largest {len(d.groups)} shown.</p>"
             if d.available and d.total_groups else "")
    return (f'<section id="{anchor}" data-section="{anchor}"><h2>{_e(title)}</h2>'
            f'<p class="note">{_e(d.note)}</p>{shown}{groups}</section>')


# ---- charts: small hand-written SVG ----------------------------------------------------------

def bar_chart(items: tuple[tuple[str, int], ...], width: int = 760) -> str:
    """Horizontal bars, one per (name, count), in the given order."""
    row, label_w = 22, 250
    bar_max = width - label_w - 90
    top = max((n for _, n in items), default=1) or 1
    bars = []
    for i, (name, n) in enumerate(items):
        y = 4 + i * row
        w = max(1, round(bar_max * n / top))
        bars.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_e(_short(name))}'
                    f'<title>{_e(name)}</title></text>'
                    f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{w}" height="{row - 6}"/>'
                    f'<text x="{label_w + w + 5}" y="{y + 15}">{n:,}</text>')
    height = 8 + row * len(items)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img">{"".join(bars)}</svg>')


def histogram(bins: tuple[int, ...], width: int = 760, height: int = 240) -> str:
    """Vertical bars of equal-width bins over [0, 1], with the x axis labeled."""
    left, bottom, top_pad = 60, 30, 12
    plot_w, plot_h = width - left - 30, height - bottom - top_pad
    top = max(bins, default=1) or 1
    bw = plot_w / max(len(bins), 1)
    bars = []
    for i, n in enumerate(bins):
        h = plot_h * n / top
        x = left + i * bw
        bars.append(f'<rect class="bar" x="{x + 1:.1f}" y="{top_pad + plot_h - h:.1f}" '
                    f'width="{bw - 2:.1f}" height="{h:.1f}"><title>{i / len(bins):.2f}-'
                    f'{(i + 1) / len(bins):.2f}: {n:,}</title></rect>')
    ticks = "".join(f'<text x="{left + plot_w * t:.1f}" y="{height - 10}" text-anchor="middle">'
                    f'{t:.2f}</text>' for t in (0, 0.25, 0.5, 0.75, 1))
    axes = (f'<line class="axis" x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" '
            f'y2="{top_pad + plot_h}"/><line class="axis" x1="{left}" y1="{top_pad}" x2="{left}" '
            f'y2="{top_pad + plot_h}"/><text x="{left - 6}" y="{top_pad + 10}" '
            f'text-anchor="end">{top:,}</text><text x="{left - 6}" y="{top_pad + plot_h}" '
            f'text-anchor="end">0</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img">{"".join(bars)}{axes}{ticks}</svg>')


def _short(text: str, most: int = 34) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


# ---- placeholders ----------------------------------------------------------------------------

def placeholder_src(text: str = "no preview") -> str:
    """An SVG image (data: URI) in place of a thumbnail that cannot be made; it decodes like
    any image, so the page has no broken <img>."""
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="160" height="120">'
           '<rect width="160" height="120" fill="#eee" stroke="#bbb"/>'
           '<path d="M20 20L140 100M140 20L20 100" stroke="#ccc" stroke-width="2"/>'
           f'<text x="80" y="66" font-family="sans-serif" font-size="14" text-anchor="middle" '
           f'fill="#666">{_e(text)}</text></svg>')
    return "data:image/svg+xml," + urllib.parse.quote(svg, safe="")
