"""Streamed listings: manifest de-duplication without a set of every id, the paged S3 listing
(against moto_server), and AWS S3 Inventory files as the listing."""
from __future__ import annotations

import datetime as dt
import shutil
import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import urllib.parse
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SKIMAGE_PHOTOS, read_summary, run_cli, save_photo, skimage_photo
from pipeline import idset, storage
from pipeline.sources import SourceStats, iter_refs
from pipeline.types import S3Options


def tiny_hash(data: bytes) -> int:
    """64 values: thousands of ids collide by dozens."""
    return zlib.crc32(data) % 64


# -- manifest de-duplication -------------------------------------------------------------------

def test_seen_ids_with_colliding_hashes_never_merges_distinct_ids():
    seen = idset.SeenIds(hasher=tiny_hash)
    ids = [f"img-{i}.jpg" for i in range(3000)]
    first = [seen.first_seen(ids[i:i + 100]) for i in range(0, 3000, 100)]
    assert all(f.all() for f in first)  # 3000 distinct ids in 64 hash values: all kept
    again = seen.first_seen(ids[::7] + ["img-new.jpg", "img-new.jpg"])
    assert not again[:-2].any()  # every repeat found, across calls and runs
    assert list(again[-2:]) == [True, False]  # a repeat within one call too
    assert len(seen) == 3001
    seen.close()


@pytest.mark.parametrize("hasher,run_cap", [(None, idset.RUN_CAP), (tiny_hash, idset.RUN_CAP),
                                            (None, 300)], ids=["hash64", "tiny", "capped-runs"])
def test_seen_ids_on_arrow_chunks_agrees_with_a_python_set(hasher, run_cap, monkeypatch):
    """Chunks with repeats inside and across them, some ids differing only in their last byte
    or length: the first occurrence of each id is new, nothing else."""
    import random

    monkeypatch.setattr(idset, "RUN_CAP", run_cap)  # capped: many runs are searched
    rng = random.Random(7)
    pool = [f"d{i % 13}/img-{i:06d}.jpg" for i in range(4000)] + ["a", "a\x00", "ab", "é"]
    seen, reference = idset.SeenIds(hasher=hasher), set()
    for _ in range(12):
        chunk = [rng.choice(pool) for _ in range(rng.randrange(1, 900))]
        want = []
        for image_id in chunk:
            want.append(image_id not in reference)
            reference.add(image_id)
        assert seen.first_seen_arrow(pa.array(chunk, pa.string())).tolist() == want
    assert len(seen) == len(reference)
    seen.close()


def test_manifest_dedupe_with_forced_collisions_keeps_every_distinct_id(tmp_path, monkeypatch):
    monkeypatch.setattr(idset, "id_hash", tiny_hash)
    names = [f"p{i:05d}.jpg" for i in range(2500)]
    lines = names + names[::3] + ["p00007.jpg", "other/p00007.jpg"]  # repeats across chunks
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(lines) + "\n")
    stats = SourceStats()
    ids = [r.image_id for r in iter_refs(str(manifest), stats)]
    assert ids == names + ["other/p00007.jpg"]  # first occurrence order, nothing merged
    assert stats.duplicates == len(names[::3]) + 1


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at the forking parent's size
PEAK_RSS_OF_LISTING = """
import re, sys
from pipeline.sources import iter_refs
n = sum(1 for _ in iter_refs(sys.argv[1]))
status = open("/proc/self/status").read()
print(n, int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024)
"""


def _listing_peak_rss(manifest, env) -> tuple[int, int]:
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_OF_LISTING, str(manifest)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    n, peak = proc.stdout.split()
    return int(n), int(peak)


def test_manifest_dedupe_memory_is_a_few_bytes_per_id(tmp_path, cli_env):
    """A Python set of 300k ids alone would take ~30 MB more than one of 10k."""
    peaks = {}
    for n in (10_000, 300_000):
        manifest = tmp_path / f"list-{n}.txt"
        manifest.write_text("".join(f"dir{i % 97}/photo-{i:08d}.jpg\n" for i in range(n)))
        listed, peaks[n] = _listing_peak_rss(manifest, cli_env)
        assert listed == n
    grown = peaks[300_000] - peaks[10_000]
    print(f"peak RSS 10k ids {peaks[10_000] / 2**20:.1f} MiB, 300k ids "
          f"{peaks[300_000] / 2**20:.1f} MiB: {grown / 290_000:.1f} bytes per extra id")
    assert grown < 290_000 * 40


# -- the paged S3 listing ----------------------------------------------------------------------

def _put(s3, key: str, body: bytes = b"x") -> None:
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body)


@pytest.fixture
def s3_listing(s3, monkeypatch):
    """A prefix of 40 image keys plus other keys; pages of 7 keys."""
    monkeypatch.setattr(storage, "LIST_PAGE_SIZE", 7)
    s3.options = S3Options(endpoint=s3.server.endpoint, max_attempts=1, connect_timeout=1,
                           request_timeout=1)
    for i in range(40):
        _put(s3, f"in/d{i % 3}/img{i:03d}.jpg", b"y" * (i + 1))
    for key in ("in/notes.txt", "in/.hidden", "in/d0/._img000.jpg", "in/d1/.thumb.jpg",
                "in/empty-folder/",
                "elsewhere/a.jpg"):
        _put(s3, key)
    return s3


def test_s3_listing_is_paged_and_matches_the_objects(s3_listing):
    s3 = s3_listing
    stats = SourceStats()
    refs = list(iter_refs(f"s3://{s3.bucket}/in/", stats, s3=s3.options))
    objects = {o["Key"]: o for page in s3.client.get_paginator("list_objects_v2").paginate(
        Bucket=s3.bucket, Prefix="in/") for o in page["Contents"]}
    expected = sorted(k[3:] for k in objects if k.endswith(".jpg") and "/." not in k)
    assert [r.image_id for r in refs] == expected  # key order, relative to the prefix
    assert stats.ignored == 4  # notes.txt and the 3 hidden keys; folder markers are not counted
    pa_info = {i.path: i for i in s3.fs.get_file_info([f"{s3.bucket}/in/{r.image_id}" for r in refs])}
    for r in refs:
        obj = objects["in/" + r.image_id]
        assert r.uri == f"s3://{s3.bucket}/in/{r.image_id}"
        assert r.file_size == obj["Size"]
        # the same mtime pyarrow's listing gave before: outputs made then are not relabeled
        assert r.mtime_ns == pa_info[f"{s3.bucket}/in/{r.image_id}"].mtime_ns
        assert r.mtime_ns // 10**6 == int(obj["LastModified"].timestamp() * 1000)


def test_s3_listing_is_pulled_lazily_not_listed_up_front(s3_listing):
    s3 = s3_listing
    refs = iter_refs(f"s3://{s3.bucket}/in/", s3=s3.options)
    first = next(refs)
    _put(s3, "in/d2/zzz-added-after-the-first-page.jpg")  # sorts after every listed key
    rest = [r.image_id for r in refs]
    assert first.image_id == "d0/img000.jpg"
    assert rest[-1] == "d2/zzz-added-after-the-first-page.jpg"


def test_s3_listing_that_fails_part_way_raises_instead_of_ending(s3_listing):
    s3 = s3_listing
    refs = iter_refs(f"s3://{s3.bucket}/in/", s3=s3.options)
    got = [next(refs) for _ in range(10)]  # two pages in
    s3.server.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(storage.S3Unavailable, match="cannot list"):
            for r in refs:
                got.append(r)
    finally:
        s3.server.proc.send_signal(signal.SIGCONT)
    assert 10 <= len(got) < 40


# -- S3 Inventory as INPUT ---------------------------------------------------------------------

CSV_SCHEMA = ("Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, "
              "StorageClass")
PARQUET_SCHEMA = ("message s3.inventory { required binary bucket (UTF8); required binary key "
                  "(UTF8); optional int64 size; optional int64 last_modified_date "
                  "(TIMESTAMP_MILLIS); optional binary e_tag (UTF8); }")


@pytest.fixture(scope="module")
def photo_bytes(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("inv-photos")
    out = {}
    for name in ("chelsea", "coffee", "rocket"):
        path = save_photo(skimage_photo(name)[::2, ::2], d / f"{name}.jpg", quality=90)
        out[name] = path.read_bytes()
    return out


def _source_objects(s3, photo_bytes) -> list[str]:
    """Photos under photos/ (one with a space, one with a plus in its key), a non-image, a
    hidden key, and a photo outside the prefix."""
    keys = {"photos/chelsea.jpg": photo_bytes["chelsea"],
            "photos/cups/coffee and milk.jpg": photo_bytes["coffee"],
            "photos/space/rocket+launch.jpg": photo_bytes["rocket"],
            "photos/readme.txt": b"text", "photos/.DS_Store": b"\0",
            "other/chelsea.jpg": photo_bytes["chelsea"]}
    for key, body in keys.items():
        _put(s3, key, body)
    return list(keys)


def _listing(s3) -> list[dict]:
    return s3.client.list_objects_v2(Bucket=s3.bucket)["Contents"]


def _csv_inventory(s3, objects: list[dict]) -> bytes:
    """As AWS writes it: gzip, no header, every field quoted, keys form-URL-encoded; here with
    an older version and a delete marker that must not count."""
    lines = []
    for o in objects:
        modified = o["LastModified"].astimezone(dt.timezone.utc)
        stamp = modified.strftime("%Y-%m-%dT%H:%M:%S.") + f"{modified.microsecond // 1000:03d}Z"
        key = urllib.parse.quote_plus(o["Key"], safe="/")
        lines.append([s3.bucket, key, "v2", "true", "false", str(o["Size"]), stamp,
                      o["ETag"].strip('"'), "STANDARD"])
        if o["Key"].endswith("chelsea.jpg"):
            lines.append([s3.bucket, key, "v1", "false", "false", "17", stamp, "0", "STANDARD"])
    lines.append([s3.bucket, "photos/deleted.jpg", "v3", "true", "true", "", lines[0][6], "", ""])
    text = "".join(",".join(f'"{v}"' for v in line) + "\n" for line in lines)
    return gzip.compress(text.encode())


def _parquet_inventory(s3, objects: list[dict]) -> bytes:
    table = pa.table({
        "bucket": pa.array([s3.bucket] * len(objects)),
        "key": pa.array([o["Key"] for o in objects]),
        "size": pa.array([o["Size"] for o in objects], pa.int64()),
        "last_modified_date": pa.array([o["LastModified"] for o in objects], pa.timestamp("ms", "UTC")),
        "e_tag": pa.array([o["ETag"].strip('"') for o in objects]),
    })
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _publish_inventory(s3, fmt: str, data: bytes, md5: str | None = None,
                       schema: str | None = None) -> str:
    """Data file + manifest.json in the destination bucket, laid out as AWS publishes them."""
    dest = f"{s3.bucket}-inventory"
    s3.client.create_bucket(Bucket=dest)
    ext = {"CSV": "csv.gz", "Parquet": "parquet", "ORC": "orc"}[fmt]
    base = f"inventory/{s3.bucket}/daily"
    data_key = f"{base}/data/3f1e0c1a-1111-4222-8333-944445555666.{ext}"
    s3.client.put_object(Bucket=dest, Key=data_key, Body=data)
    manifest = {
        "sourceBucket": s3.bucket, "destinationBucket": f"arn:aws:s3:::{dest}",
        "version": "2016-11-30", "creationTimestamp": "1796086800000", "fileFormat": fmt,
        "fileSchema": schema or (CSV_SCHEMA if fmt == "CSV" else PARQUET_SCHEMA),
        "files": [{"key": data_key, "size": len(data),
                   "MD5checksum": md5 or hashlib.md5(data).hexdigest()}],
    }
    key = f"{base}/2026-12-01T01-00Z/manifest.json"
    s3.client.put_object(Bucket=dest, Key=key, Body=json.dumps(manifest).encode())
    return f"s3://{dest}/{key}"


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_inventory_input_labels_the_listed_images_and_a_listing_run_then_skips_them(
        s3, photo_bytes, cli_env, tmp_path, fmt):
    _source_objects(s3, photo_bytes)
    objects = _listing(s3)
    data = _csv_inventory(s3, objects) if fmt == "CSV" else _parquet_inventory(s3, objects)
    manifest = _publish_inventory(s3, fmt, data)
    env, out = {**cli_env, **s3.env}, tmp_path / "out"

    proc = run_cli(["label", manifest, out, "--inventory-prefix", "photos/", "--json",
                    "--progress", "none"], env)
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(proc)
    assert (summary["labeled"], summary["errors"], summary["ignored_files"]) == (3, 0, 2)  # .txt, .DS_Store

    rows = pd.read_parquet(out).set_index("image_id").sort_index()
    assert list(rows.index) == ["chelsea.jpg", "cups/coffee and milk.jpg",
                                "space/rocket+launch.jpg"]
    by_key = {o["Key"]: o for o in objects}
    for image_id, row in rows.iterrows():
        obj = by_key["photos/" + image_id]
        assert row.uri == f"s3://{s3.bucket}/photos/{image_id}"
        assert row.status == "ok" and row.file_size == obj["Size"]
        assert row.mtime == pd.Timestamp(obj["LastModified"]).tz_convert("UTC").floor("ms")
        wanted = SKIMAGE_PHOTOS[os.path.splitext(image_id)[0].split("/")[-1].split(" ")[0]
                                .split("+")[0]]
        assert wanted & set(row.label_ids), (image_id, list(row.label_ids))

    # the same images listed by prefix: same ids, sizes and mtimes, so nothing is relabeled
    again = run_cli(["label", f"s3://{s3.bucket}/photos/", out, "--json"], env)
    assert again.returncode == 0, again.stderr
    assert (read_summary(again)["skipped"], read_summary(again)["labeled"]) == (3, 0)


def test_inventory_whole_bucket_ids_are_the_keys(s3, photo_bytes, cli_env, tmp_path):
    _source_objects(s3, photo_bytes)
    manifest = _publish_inventory(s3, "Parquet", _parquet_inventory(s3, _listing(s3)))
    out = tmp_path / "out"
    proc = run_cli(["label", manifest, out, "--json"], {**cli_env, **s3.env})
    assert proc.returncode == 0, proc.stderr
    assert sorted(pd.read_parquet(out).image_id) == [
        "other/chelsea.jpg", "photos/chelsea.jpg", "photos/cups/coffee and milk.jpg",
        "photos/space/rocket+launch.jpg"]


def test_inventory_file_not_matching_its_manifest_stops_the_run(s3, photo_bytes, cli_env,
                                                                tmp_path):
    _source_objects(s3, photo_bytes)
    manifest = _publish_inventory(s3, "CSV", _csv_inventory(s3, _listing(s3)), md5="0" * 32)
    proc = run_cli(["label", manifest, tmp_path / "out"], {**cli_env, **s3.env})
    assert proc.returncode == 4, proc.stderr
    assert "MD5" in proc.stderr and "Traceback" not in proc.stderr


def test_inventory_without_size_or_mtime_is_a_usage_error(s3, cli_env, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"destinationBucket": "arn:aws:s3:::x", "fileFormat": "CSV",
                                    "fileSchema": "Bucket, Key, ETag", "files": []}))
    proc = run_cli(["label", manifest, tmp_path / "out"], {**cli_env, **s3.env})
    assert proc.returncode == 2, proc.stderr
    assert "size, last_modified_date" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before OUTPUT was touched


def test_s3_listing_of_a_missing_bucket_is_a_usage_error(s3, cli_env, tmp_path):
    proc = run_cli(["label", f"s3://{s3.bucket}-missing/in/", tmp_path / "out"],
                   {**cli_env, **s3.env})
    assert proc.returncode == 2, proc.stderr
    assert "no such bucket" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before OUTPUT was touched


ORC_SCHEMA = ("struct<bucket:string,key:string,version_id:string,is_latest:boolean,"
              "is_delete_marker:boolean,size:bigint,last_modified_date:timestamp,e_tag:string>")


def test_orc_inventory_rows_are_the_current_objects(s3, photo_bytes):
    """ORC as AWS writes it (all versions): old versions and delete markers are left out."""
    import pyarrow.orc as orc

    from pipeline import inventory

    _source_objects(s3, photo_bytes)
    objects = _listing(s3)
    rows = [(o["Key"], "v2", True, False, o["Size"], o["LastModified"]) for o in objects]
    rows += [("photos/chelsea.jpg", "v1", False, False, 5, objects[0]["LastModified"]),
             ("photos/gone.jpg", "v9", True, True, None, objects[0]["LastModified"])]
    table = pa.table({
        "bucket": [s3.bucket] * len(rows), "key": [r[0] for r in rows],
        "version_id": [r[1] for r in rows], "is_latest": [r[2] for r in rows],
        "is_delete_marker": [r[3] for r in rows], "size": pa.array([r[4] for r in rows], pa.int64()),
        "last_modified_date": pa.array([r[5].replace(tzinfo=None) for r in rows], pa.timestamp("ms")),
        "e_tag": ["x"] * len(rows)})
    sink = io.BytesIO()
    orc.write_table(table, sink)
    uri = _publish_inventory(s3, "ORC", sink.getvalue(), schema=ORC_SCHEMA)
    options = S3Options(endpoint=s3.server.endpoint)
    inv = inventory.read_manifest(uri, options)
    assert inv.columns[:3] == ("bucket", "key", "version_id")
    got = {(o.bucket, o.key, o.size, o.mtime_ns) for o in inventory.iter_objects(inv, options)}
    assert got == {(s3.bucket, o["Key"], o["Size"],
                    int(o["LastModified"].timestamp() * 1000) * 10**6) for o in objects}


def _archive_part(out, rows: list[tuple[str, int, int]], model: str) -> None:
    """A committed part of ok rows (image_id, file_size, mtime in ns) in the writer's schema."""
    from pipeline.store.schema import SCHEMA

    out.mkdir()
    n = len(rows)
    columns = {
        "image_id": pa.array([r[0] for r in rows], pa.string()),
        "uri": pa.array([f"s3://x/{r[0]}" for r in rows], pa.string()),
        "status": pa.array(["ok"] * n, pa.string()),
        "file_size": pa.array([r[1] for r in rows], pa.int64()),
        "mtime": pa.array([r[2] // 1000 for r in rows], pa.int64()).cast(pa.timestamp("us", "UTC")),
        "model": pa.array([model] * n, pa.string()),
        "run_id": pa.array(["20260101T000000Z-archive"] * n, pa.string()),
        "labeled_at": pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)] * n,
                               pa.timestamp("us", "UTC")),
    }
    schema = SCHEMA.with_metadata({"pipeline.model": model})
    table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in schema},
                     schema=schema)
    pq.write_table(table, out / "part-20260101T000000Z-archive-000000.parquet")


def test_inventory_of_100k_rows_makes_refs_only_for_the_new_and_changed_objects(
        s3, tmp_path, monkeypatch):
    """100k current objects (in 4 Parquet row groups, with old versions and delete markers) of
    which 99,970 are labeled with their size and mtime: the run's pending refs are exactly the
    25 new ones and the 5 whose size changed, and no ImageRef is made for the others."""
    from pipeline import doneset, store
    from pipeline.run import Pending
    from pipeline.sources import iter_chunks, s3listing

    n = 100_000
    stamp = dt.datetime(2026, 11, 30, 12, 0, 0, 123000, tzinfo=dt.timezone.utc)
    mtime_ns = int(stamp.timestamp()) * 10**9 + 123 * 10**6
    keys = [f"photos/d{i % 97:02d}/img{i:06d}.jpg" for i in range(n)]
    new = {keys[i] for i in range(0, n, n // 25)}
    changed = {keys[i + 1] for i in range(0, n, n // 5)}
    labeled = [(k[len("photos/"):], 1000 + i + (k in changed), mtime_ns)
               for i, k in enumerate(keys) if k not in new]
    extra = ["photos/notes.txt", "photos/.hidden/img.jpg", "other/img000001.jpg"]
    table = pa.table({
        "bucket": [s3.bucket] * (n + len(extra) + 2),
        "key": keys + extra + [keys[3], keys[4]],
        "is_latest": [True] * (n + len(extra)) + [False, True],
        "is_delete_marker": [False] * (n + len(extra)) + [False, True],
        "size": pa.array([1000 + i for i in range(n)] + [1, 2, 3, 7, None], pa.int64()),
        "last_modified_date": pa.array([stamp] * (n + len(extra) + 2), pa.timestamp("ms", "UTC")),
    })
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=30_000)
    schema = ("message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); "
              "optional boolean is_latest; optional boolean is_delete_marker; optional int64 "
              "size; optional int64 last_modified_date (TIMESTAMP_MILLIS); }")
    manifest = _publish_inventory(s3, "Parquet", sink.getvalue(), schema=schema)
    _archive_part(tmp_path / "out", labeled, "m")

    made = []

    class CountedRef(s3listing.ImageRef):
        def __init__(self, *args, **kwargs):
            made.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(s3listing, "ImageRef", CountedRef)
    stats = SourceStats()
    options = S3Options(endpoint=s3.server.endpoint)
    done = doneset.done_set(store.open_output(str(tmp_path / "out")), doneset.Identity("m"))
    chunks = iter_chunks(manifest, stats, "photos", options)
    pending = list(Pending(chunks, done))
    expected = sorted(k[len("photos/"):] for k in new | changed)
    assert sorted(r.image_id for r in pending) == expected
    assert sorted(made) == expected  # refs for the pending rows only
    assert {r.uri for r in pending} == {f"s3://{s3.bucket}/{k}" for k in new | changed}
    assert all(r.mtime_ns == mtime_ns for r in pending)
    assert (stats.listed, stats.ignored) == (n, 2)  # notes.txt and the hidden key


# -- manifests read as columns -----------------------------------------------------------------

def _manifest_table(rows: list[dict]) -> pa.Table:
    return pa.table({k: [r.get(k) for r in rows] for k in ("id", "path")})


def test_columnar_and_per_entry_manifest_reading_give_the_same_refs(tmp_path):
    """A Parquet manifest whose first batch is plain (read as columns) and whose second has a
    padded id, a blank row and a backslash (read entry by entry): ids, uris, sizes and
    duplicates as the documented rules say, whichever way a batch was read."""
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "img" / name).write_bytes(b"x" * (len(name) + 10))
    plain = [{"id": f"id{i}", "path": f"img/{'abc'[i % 3]}.jpg"} for i in range(6)]
    odd = [{"id": "  id7 ", "path": "img/a.jpg"}, {"id": None, "path": None},
           {"id": None, "path": "img\\b.jpg"}, {"id": "id2", "path": "img/c.jpg"},
           {"id": "id8", "path": "img/missing.jpg"}]
    manifest = tmp_path / "m.parquet"
    with pq.ParquetWriter(manifest, pa.schema([("id", pa.string()), ("path", pa.string())])) as w:
        w.write_table(_manifest_table(plain))  # one row group each
        w.write_table(_manifest_table(odd))
    stats = SourceStats()
    refs = list(iter_refs(str(manifest), stats))
    img = os.path.abspath(tmp_path / "img")
    assert [(r.image_id, r.uri, r.file_size) for r in refs] == [
        ("id0", f"{img}/a.jpg", 15), ("id1", f"{img}/b.jpg", 15), ("id2", f"{img}/c.jpg", 15),
        ("id3", f"{img}/a.jpg", 15), ("id4", f"{img}/b.jpg", 15), ("id5", f"{img}/c.jpg", 15),
        ("id7", f"{img}/a.jpg", 15), ("img\\\\b.jpg", str(tmp_path / "img\\b.jpg"), None),
        ("id8", f"{img}/missing.jpg", None)]
    assert refs[0].mtime_ns == (tmp_path / "img" / "a.jpg").stat().st_mtime_ns
    assert stats.duplicates == 1 and stats.listed == 9


def test_manifest_with_size_and_mtime_columns_is_trusted_without_a_stat(tmp_path, cli, photos_dir):
    """Like an S3 Inventory, a manifest with size and mtime columns gives each ref those values:
    the file is not stat'ed (so a file changed on disk but not in the manifest stays done), a
    changed manifest row is labeled again, and a row without them is stat'ed."""
    src = tmp_path / "photos"
    shutil.copytree(photos_dir, src)
    jpgs = sorted(src.glob("*.jpg"))[:3]
    when = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)

    def write(rows):
        pq.write_table(pa.table({"path": [str(p) for p, _, _ in rows],
                                 "size": pa.array([s for _, s, _ in rows], pa.int64()),
                                 "mtime": pa.array([m for _, _, m in rows],
                                                   pa.timestamp("ms", tz="UTC"))}),
                       tmp_path / "m.parquet")

    rows = [(p, p.stat().st_size, when) for p in jpgs[:2]] + [(jpgs[2], None, None)]
    write(rows)
    refs = list(iter_refs(str(tmp_path / "m.parquet")))
    assert [(r.file_size, r.mtime_ns) for r in refs[:2]] == \
        [(p.stat().st_size, int(when.timestamp()) * 10**9) for p in jpgs[:2]]
    assert (refs[2].file_size, refs[2].mtime_ns) == (jpgs[2].stat().st_size,
                                                     jpgs[2].stat().st_mtime_ns)

    out = tmp_path / "out"
    first = read_summary(cli("label", tmp_path / "m.parquet", out, "--json"))
    assert (first["labeled"], first["skipped"]) == (3, 0)
    os.utime(jpgs[0], ns=(0, 10**18))  # changed on disk only: the manifest is what counts
    again = read_summary(cli("label", tmp_path / "m.parquet", out, "--json"))
    assert (again["labeled"], again["skipped"]) == (0, 3)
    write([(jpgs[0], rows[0][1], when + dt.timedelta(seconds=1))] + rows[1:])
    changed = read_summary(cli("label", tmp_path / "m.parquet", out, "--json"))
    assert (changed["labeled"], changed["skipped"]) == (1, 2)
    latest = pd.read_parquet(out).sort_values("labeled_at").groupby("image_id").last()
    assert latest.loc[str(jpgs[0]), "mtime"] == pd.Timestamp(when + dt.timedelta(seconds=1))


def test_csv_manifest_with_size_and_mtime_and_wrong_types(tmp_path, cli, photos_dir):
    jpg = sorted(photos_dir.glob("*.jpg"))[0]
    good = tmp_path / "m.csv"
    good.write_text(f"path,size,mtime\n{jpg},123,2024-05-01T00:00:00Z\n")
    [ref] = iter_refs(str(good))
    assert (ref.file_size, ref.mtime_ns) == (123, 1714521600 * 10**9)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"path": [str(jpg)], "size": [1], "mtime": ["yesterday"]}), bad)
    proc = cli("label", bad, tmp_path / "out")
    assert proc.returncode == 2
    assert "mtime column timestamps" in proc.stderr
    assert not (tmp_path / "out").exists()


def _trusted_manifest(path, ids):
    """A Parquet manifest of `ids` with path, size (the row number) and mtime columns."""
    n = len(ids)
    stamp = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    pq.write_table(pa.table({
        "id": ids, "path": [f"/archive/{i}.jpg" for i in range(n)],
        "size": pa.array(range(n), pa.int64()),
        "mtime": pa.array([stamp] * n, pa.timestamp("us", "UTC"))}), path)
    return path


def test_parquet_manifest_with_duplicates_across_record_batches_keeps_the_first_of_each(tmp_path):
    """150k rows read in 64k-row batches as columns (size and mtime given: nothing stat'ed);
    ids repeat within a batch and across batches: the first row of each id wins, each repeat is
    counted."""
    n = 150_000
    ids = [f"img{i:06d}.jpg" for i in range(n)]
    repeats = {70_000: 5, 70_001: 69_999, 140_000: 10, 140_001: 70_000, 149_999: 149_998}
    for row, first in repeats.items():
        ids[row] = ids[first]
    manifest = _trusted_manifest(tmp_path / "m.parquet", ids)
    stats = SourceStats()
    refs = list(iter_refs(str(manifest), stats))
    assert stats.duplicates == len(repeats)
    kept = [i for i in range(n) if i not in repeats]
    assert [r.image_id for r in refs] == [ids[i] for i in kept]
    assert [r.uri for r in refs] == [f"/archive/{i}.jpg" for i in kept]
    assert [r.file_size for r in refs] == kept


def test_an_s3_image_uri_is_one_image_with_its_size_and_a_missing_one_is_a_usage_error(
        s3, photo_bytes, cli_env, tmp_path):
    s3.client.put_object(Bucket=s3.bucket, Key="one/photo.jpg", Body=photo_bytes["chelsea"])
    env = {**cli_env, **s3.env}
    proc = run_cli(["label", f"s3://{s3.bucket}/one/photo.jpg", tmp_path / "out", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert [(r["image_id"], r["file_size"], r["status"]) for r in rows] == \
        [("photo.jpg", len(photo_bytes["chelsea"]), "ok")]
    proc = run_cli(["label", f"s3://{s3.bucket}/one/gone.jpg", tmp_path / "gone"], env)
    assert proc.returncode == 2 and "input not found" in proc.stderr, proc.stderr


# -- de-duplication with the done set's lookup (KnownIds) -------------------------------------

def _lookup_of(known_ids):
    """A plain-Python KnownIds.lookup: each id's index in `known_ids`, or -1."""
    index = {s.encode("utf-8", "surrogateescape"): i for i, s in enumerate(known_ids)}

    def lookup(ids):
        return np.array([index.get(v, -1) for v in ids.cast(pa.binary()).to_pylist()], np.int64)
    return lookup


@pytest.mark.parametrize("hasher", [None, tiny_hash], ids=["hash64", "tiny"])
def test_seen_ids_with_a_lookup_agrees_with_a_python_set(hasher):
    """Chunks before and after `know` (the run's done set arrives after the listing's first
    chunk), known and new ids mixed, repeats within a chunk in any order and across chunks,
    non-ASCII and near-identical ids, and per-entry string chunks: the first occurrence of
    each id is new, nothing else, and the lookup's answer is returned per row."""
    import random

    rng = random.Random(3)
    known_ids = [f"d{i % 7}/img-{i:05d}.jpg" for i in range(3000)] + ["é", "a", "ab", "a\x00"]
    pool = known_ids + [f"new/{i}.jpg" for i in range(400)] + ["b", "é/ü", ""]
    lookup = _lookup_of(known_ids)
    seen, reference = idset.SeenIds(hasher=hasher), set()
    for step in range(14):
        if step == 3:
            seen.know(lookup)
        chunk = [rng.choice(pool) for _ in range(rng.randrange(1, 700))]
        if step % 4 == 1:  # rising indices of known ids: the no-repeat shortcut
            chunk = sorted(set(chunk) & set(known_ids), key=known_ids.index) or chunk
        want = []
        for image_id in chunk:
            want.append(image_id not in reference)
            reference.add(image_id)
        if step == 6:
            assert seen.first_seen(chunk).tolist() == want  # the per-entry path
            continue
        first, found = seen.first_seen_found(pa.array(chunk, pa.string()))
        assert first.tolist() == want
        if step >= 3:
            assert found.tolist() == lookup(pa.array(chunk, pa.string())).tolist()
        else:
            assert found is None
    assert len(seen) == len(reference)
    seen.close()


def test_a_manifest_listed_with_the_done_sets_lookup_keeps_the_first_of_each(tmp_path):
    """A Parquet manifest of 150k rows (64k-row batches) whose ids repeat within and across
    batches, listed as a run lists it (the lookup arrives after the first chunk): the same refs
    as without a lookup, the first row of each id with its own size, the repeats counted, and
    each chunk's entries are the lookup's."""
    from pipeline.sources import KnownIds, iter_chunks

    n = 150_000
    ids = [f"img{i:06d}.jpg" for i in range(n)]
    repeats = {70_000: 5, 70_001: 69_999, 70_003: 70_002, 70_010: 70_004, 140_000: 10,
               140_001: 70_000, 140_002: 66_000,
               149_999: 149_998, 100: 3}
    for row, first in repeats.items():
        ids[row] = ids[first]
    manifest = _trusted_manifest(tmp_path / "m.parquet", ids)
    known_ids = [f"img{i:06d}.jpg" for i in range(0, n, 2)]  # every other id is "done"
    lookup = _lookup_of(known_ids)
    known, stats = KnownIds(), SourceStats()
    refs = []
    for number, chunk in enumerate(iter_chunks(str(manifest), stats, known=known)):
        if number == 0:
            known.lookup = lookup  # as run.label does once its done set is built
            assert chunk.found is None
        else:
            assert chunk.found.tolist() == lookup(chunk.ids).tolist()
        refs.extend(chunk.refs())
    kept = [i for i in range(n) if i not in repeats]
    assert stats.duplicates == len(repeats)
    assert [r.image_id for r in refs] == [ids[i] for i in kept]
    assert [r.file_size for r in refs] == kept
    assert [r.image_id for r in iter_refs(str(manifest))] == [ids[i] for i in kept]
