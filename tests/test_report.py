"""`pipeline report`: the page is opened in a real headless Chromium (Debian `chromium`, driven
by Playwright, which never downloads a browser here) on a real `pipeline label` output."""
from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from badfiles import jpeg, png_header_only, truncated
from conftest import ROOT, save_photo, skimage_photo, upload_dir

from pipeline import thumbnails
from pipeline.report import ReportOptions, write_report
from pipeline.types import ReadLimits, S3Options
from pipeline.writer import SCHEMA

ESCAPE_ID = "<script>alert(1)</script>.jpg"
SECTIONS = {"header", "totals", "runs", "model", "top-labels", "scores", "contact-sheets",
            "review", "errors", "exact-duplicates", "near-duplicates"}
EMBEDDING_SIZE = 1280


# ---- Chromium --------------------------------------------------------------------------------

def _chromium() -> str:
    """/usr/bin/chromium, installed with apt-get when missing and we are root (CI: a clean
    Debian machine); a user's laptop without it and without root skips with the reason."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("the report is tested in Debian's chromium: not installed, and not root to "
                    "install it (sudo apt-get install chromium)")
    with open("/tmp/pipeline-tests-chromium.lock", "w") as lock:  # xdist workers: one apt-get
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not shutil.which("chromium"):
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            proc = subprocess.run("apt-get update -qq && apt-get install -y -qq chromium",
                                  shell=True, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not shutil.which("chromium"):
                pytest.fail(f"cannot install chromium with apt-get: {proc.stderr[-2000:]}")
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


class Loaded:
    """A page opened in Chromium, with everything it complained about."""

    def __init__(self, browser, path: Path):
        self.page = browser.new_page(viewport={"width": 1100, "height": 900})
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type in ("error", "warning")
                     and self.problems.append(f"console {m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url}"))
        self.page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))
        self.page.goto(path.resolve().as_uri(), wait_until="load")

    def images(self) -> list[dict]:
        return self.page.evaluate("""Array.from(document.images).map(i => ({
            alt: i.alt, complete: i.complete, width: i.naturalWidth, src: i.getAttribute('src'),
            placeholder: i.dataset.placeholder === '1',
            section: i.closest('[data-section]') ? i.closest('[data-section]').dataset.section : null,
            group: i.closest('.tiles') ? Array.from(i.closest('.tiles').querySelectorAll('img'))
                                           .map(x => x.alt).sort().join('|') : null}))""")

    def sections(self) -> set[str]:
        return set(self.page.evaluate(
            "Array.from(document.querySelectorAll('[data-section]')).map(e => e.dataset.section)"))

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector)

    def screenshot_spread(self) -> float:
        from PIL import Image

        shot = Image.open(io.BytesIO(self.page.screenshot(full_page=True))).convert("L")
        return float(np.asarray(shot, dtype=np.float32).std())

    def close(self):
        self.page.close()


@pytest.fixture
def open_page(browser):
    opened = []

    def load(path: Path) -> Loaded:
        opened.append(Loaded(browser, path))
        return opened[-1]

    yield load
    for p in opened:
        p.close()


# ---- a real labeled output -------------------------------------------------------------------

@pytest.fixture(scope="module")
def labeled(tmp_path_factory, cli_env) -> Path:
    """`pipeline label --embeddings` over real photos: a byte-identical pair (chelsea), the
    same photo as JPEG and PNG (coffee), a corrupt JPEG, a file named like a script tag (a
    smaller JPEG of astronaut.jpg), and rocket.jpg deleted after labeling (its row points at a
    missing file)."""
    base = tmp_path_factory.mktemp("report")
    photos = base / "photos"
    save_photo(skimage_photo("chelsea"), photos / "chelsea.jpg", quality=90)
    shutil.copy(photos / "chelsea.jpg", photos / "chelsea_copy.jpg")
    save_photo(skimage_photo("coffee"), photos / "coffee.jpg", quality=90)
    save_photo(skimage_photo("coffee"), photos / "coffee.png")
    save_photo(skimage_photo("astronaut"), photos / "astronaut.jpg", quality=90)
    save_photo(skimage_photo("motorcycle"), photos / "motorcycle.jpg", quality=90)
    save_photo(skimage_photo("rocket"), photos / "rocket.jpg", quality=90)
    (photos / "corrupt.jpg").write_bytes(truncated(jpeg(skimage_photo("rocket"))))
    (photos / ESCAPE_ID).parent.mkdir()  # the "/" of "</script>" makes a folder
    save_photo(np.ascontiguousarray(skimage_photo("astronaut")[::2, ::2]), photos / ESCAPE_ID,
               quality=80)
    out = base / "out"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "label", str(photos), str(out),
                           "--embeddings", "--max-error-rate", "1"], env=cli_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    (photos / "rocket.jpg").unlink()
    return out


def _report(cli_env, output, html: Path, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "report", str(output), "-o",
                           str(html), *map(str, args)], env=cli_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_report_of_a_labeled_output_renders_in_chromium(labeled, cli_env, tmp_path, open_page):
    html = tmp_path / "report.html"
    _report(cli_env, labeled, html)
    page = open_page(html)

    assert page.problems == []
    assert SECTIONS <= page.sections()
    images = page.images()
    assert images and all(i["complete"] and i["width"] > 0 for i in images), images
    assert all(i["src"].startswith("data:") for i in images)  # one self-contained file
    shown = {i["alt"] for i in images}
    assert {"chelsea.jpg", "coffee.png", "astronaut.jpg", "rocket.jpg", ESCAPE_ID} <= shown
    assert "corrupt.jpg" not in shown  # an error row has no label to show
    missing = [i for i in images if i["alt"] == "rocket.jpg"]
    assert missing and all(i["placeholder"] for i in missing)
    assert not any(i["placeholder"] for i in images if i["alt"] != "rocket.jpg")
    assert page.screenshot_spread() > 20  # not a blank page

    totals = page.text("#totals")
    assert "efficientnet_lite0" in totals and "corrupt 1" in totals
    assert "corrupt.jpg" in page.text("#errors") and "JPEG" in page.text("#errors")
    assert "cat" in page.text("[data-section=top-labels]")  # chelsea is a cat, twice

    groups = {(i["section"], i["group"]) for i in images
              if i["section"] in ("exact-duplicates", "near-duplicates")}
    # coffee as JPEG and PNG: cosine ~0.99; the half-size astronaut copy ~0.90 (both >= 0.7);
    # the byte-identical chelsea pair is an exact group, not repeated as a near one
    assert groups == {("exact-duplicates", "chelsea.jpg|chelsea_copy.jpg"),
                      ("near-duplicates", "coffee.jpg|coffee.png"),
                      ("near-duplicates", f"{ESCAPE_ID}|astronaut.jpg")}


def test_data_strings_appear_as_text_never_as_markup(labeled, cli_env, tmp_path, open_page):
    html = tmp_path / "report.html"
    _report(cli_env, labeled, html)
    page = open_page(html)

    assert page.problems == []  # no alert() dialog
    assert page.page.evaluate("document.querySelectorAll('script').length") == 0
    assert ESCAPE_ID in page.text("[data-section=review]")
    assert page.page.evaluate(
        f"Array.from(document.querySelectorAll('figcaption span')).some("
        f"s => s.textContent === {ESCAPE_ID!r})")


def test_thumbnails_beside_the_page(labeled, cli_env, tmp_path, open_page):
    html = tmp_path / "site" / "index.html"
    html.parent.mkdir()
    _report(cli_env, labeled, html, "--thumbnails", "dir")
    files = sorted((html.parent / "index_thumbnails").iterdir())
    page = open_page(html)

    assert page.problems == []
    images = page.images()
    assert all(i["width"] > 0 for i in images)
    from_files = {i["src"] for i in images if not i["src"].startswith("data:")}
    assert len(from_files) == len(files) >= 7  # every photo but the missing one
    assert not any(i["src"].startswith("data:image/jpeg") for i in images)


def test_thumbnail_cap(labeled, tmp_path, open_page):
    html = tmp_path / "report.html"
    summary = write_report(str(labeled), str(html), ReportOptions(max_thumbnails=2))
    page = open_page(html)

    assert summary.thumbnails + summary.placeholders == 2
    images = page.images()
    assert len({i["src"] for i in images if i["src"].startswith("data:image/jpeg")}) <= 2
    assert all(i["width"] > 0 for i in images)
    assert page.problems == []


# ---- duplicates: parts with content_sha256 and embedding -------------------------------------

def _with_hash_and_embeddings(labeled: Path, dest: Path) -> Path:
    """A copy of the labeled OUTPUT whose parts also have content_sha256 (of the files' bytes,
    null where the file is gone) and embedding: one random direction per photo, coffee.jpg and
    coffee.png almost the same direction, the byte-identical chelsea pair exactly the same."""
    shutil.copytree(labeled, dest)
    rng = np.random.default_rng(7)
    directions = {}
    for part in sorted(dest.glob("part-*.parquet")):
        table = pq.read_table(part)
        digests, vectors = [], []
        for uri, image_id in zip(table["uri"].to_pylist(), table["image_id"].to_pylist()):
            data = Path(uri).read_bytes() if os.path.exists(uri) else None
            digests.append(hashlib.sha256(data).hexdigest() if data is not None else None)
            photo = image_id.replace("_copy", "").rsplit(".", 1)[0]
            if photo not in directions:
                directions[photo] = rng.standard_normal(EMBEDDING_SIZE)
            v = directions[photo] + (0.05 * rng.standard_normal(EMBEDDING_SIZE)
                                     if image_id == "coffee.png" else 0)
            vectors.append((v / np.linalg.norm(v)).astype(np.float32))
        embedding = pa.FixedSizeListArray.from_arrays(  # float16, as --embeddings writes it
            pa.array(np.concatenate(vectors).astype(np.float16), pa.float16()), EMBEDDING_SIZE)
        table = _replaced(table, "content_sha256", pa.array(digests, pa.string()))
        table = _replaced(table, "embedding", embedding)
        pq.write_table(table, part)
    return dest


def _replaced(table: pa.Table, name: str, values) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def test_duplicate_groups(labeled, tmp_path, open_page):
    output = _with_hash_and_embeddings(labeled, tmp_path / "out")
    html = tmp_path / "report.html"
    write_report(str(output), str(html))
    page = open_page(html)

    assert page.problems == []
    images = page.images()
    assert all(i["width"] > 0 for i in images)
    exact = {i["group"] for i in images if i["section"] == "exact-duplicates"}
    near = {i["group"] for i in images if i["section"] == "near-duplicates"}
    assert exact == {"chelsea.jpg|chelsea_copy.jpg"}
    assert near == {"coffee.jpg|coffee.png"}  # the identical chelsea pair is not repeated here
    assert "2 images in 1 groups" in page.text("#exact-duplicates")


def test_near_threshold_decides(labeled, tmp_path, open_page):
    output = _with_hash_and_embeddings(labeled, tmp_path / "out")
    html = tmp_path / "report.html"
    write_report(str(output), str(html), ReportOptions(near_threshold=0.9999))
    page = open_page(html)

    assert not [i for i in page.images() if i["section"] == "near-duplicates"]
    assert "cosine similarity >= 0.9999" in page.text("#near-duplicates")


# ---- sources on S3, OUTPUT on S3 -------------------------------------------------------------

def test_report_of_an_s3_output_with_s3_sources(s3, tmp_path, cli_env, open_page):
    local = tmp_path / "photos"
    save_photo(skimage_photo("chelsea"), local / "cat.jpg", quality=85)
    save_photo(skimage_photo("coffee"), local / "cup.png")
    upload_dir(s3.client, s3.bucket, local, "photos")
    uris = [f"s3://{s3.bucket}/photos/cat.jpg", f"s3://{s3.bucket}/photos/cup.png",
            f"s3://{s3.bucket}/photos/gone.jpg"]
    table = _rows(["cat.jpg", "cup.png", "gone.jpg"], uris, ["tabby", "espresso", "tabby"],
                  [0.9, 0.8, 0.7])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    s3.client.put_object(Bucket=s3.bucket, Key="out/part-20260101T000000Z-abcdef-00000.parquet",
                         Body=buffer.getvalue())
    html = tmp_path / "report.html"
    _report({**cli_env, **s3.env}, f"s3://{s3.bucket}/out", html)
    page = open_page(html)

    assert page.problems == []
    images = {i["alt"]: i for i in page.images()}
    assert images["cat.jpg"]["width"] > 0 and not images["cat.jpg"]["placeholder"]
    assert images["cup.png"]["width"] > 0 and not images["cup.png"]["placeholder"]
    assert images["gone.jpg"]["width"] > 0 and images["gone.jpg"]["placeholder"]
    assert "not available: label with --embeddings" in page.text("#near-duplicates")


def _rows(ids: list[str], uris: list[str], labels: list[str], scores: list[float],
          model: str = "efficientnet_lite0") -> pa.Table:
    """Rows in the writer's schema (ok rows)."""
    n = len(ids)
    now = pa.scalar(1_767_225_600_000_000, pa.timestamp("us", tz="UTC"))
    columns = {
        "image_id": ids, "uri": uris, "status": ["ok"] * n, "error_kind": [None] * n,
        "error": [None] * n, "width": [100] * n, "height": [100] * n, "file_size": [1000] * n,
        "mtime": pa.array([now] * n), "label_id": [f"n{i:08d}" for i in range(n)],
        "label": labels, "score": scores, "label_ids": [[f"n{i:08d}"] for i in range(n)],
        "labels": [[lab] for lab in labels], "scores": [[s] for s in scores],
        "model": [model] * n, "run_id": ["20260101T000000Z-abcdef"] * n,
        "labeled_at": pa.array([now] * n)}
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in SCHEMA},
                    schema=SCHEMA)


# ---- hostile sources: a placeholder, quickly -------------------------------------------------

@pytest.mark.parametrize("name, content, limits, kind", [
    ("huge_header.png", png_header_only(100_000, 100_000), ReadLimits(), "too_large"),
    ("big.png", None, ReadLimits(max_pixels=1_000_000), "too_large"),
    ("big_file.jpg", None, ReadLimits(max_file_bytes=10_000), "too_large"),
    ("cut.jpg", truncated(jpeg(skimage_photo("chelsea"))), ReadLimits(), "corrupt"),
    ("noise.jpg", os.urandom(5000), ReadLimits(), "unsupported_format"),
    ("empty.jpg", b"", ReadLimits(), "empty_file"),
    ("gone.jpg", "missing", ReadLimits(), "not_found"),
    ("fifo.jpg", "fifo", ReadLimits(), "unreadable"),
])
def test_a_bad_source_gets_a_reason_not_a_hang(tmp_path, name, content, limits, kind):
    path = tmp_path / name
    if content is None:
        save_photo(np.zeros((1000, 2000, 3), np.uint8) + 90, path)
    elif content == "fifo":
        os.mkfifo(path)
    elif content != "missing":
        path.write_bytes(content)
    started = time.monotonic()
    thumb = thumbnails.make(str(path), 160, limits, S3Options())
    assert thumb.jpeg is None and thumb.kind == kind, thumb
    assert time.monotonic() - started < 5


def test_a_good_source_gets_a_small_upright_jpeg(tmp_path):
    from PIL import Image

    path = save_photo(skimage_photo("astronaut"), tmp_path / "a.png")
    thumb = thumbnails.make(str(path), 160, ReadLimits(), S3Options())
    image = Image.open(io.BytesIO(thumb.jpeg))
    assert image.format == "JPEG" and max(image.size) == 160 and len(thumb.jpeg) < 20_000


# ---- CLI -------------------------------------------------------------------------------------

def test_cli_usage_errors(cli, tmp_path, labeled):
    missing = cli("report", tmp_path / "nothing", "-o", tmp_path / "r.html")
    assert missing.returncode == 2 and "OUTPUT not found" in missing.stderr
    bad = cli("report", labeled, "-o", tmp_path / "r.html", "--thumbnails", "inline")
    assert bad.returncode == 2 and "--thumbnails" in bad.stderr
    assert not (tmp_path / "r.html").exists()


def test_report_imports_no_tensorflow():
    code = ("import sys, pipeline.report, pipeline.thumbnails; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
