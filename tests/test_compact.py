"""`pipeline compact`: the latest row per (image_id, model), rewritten atomically; real kills."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import chaos, labeled_rows, latest, read_summary, run_cli


def key(df):
    return sorted(zip(df.image_id, df.run_id, df.labeled_at))


@pytest.fixture(scope="module")
def relabeled_once(cli_env, originals, tmp_path_factory):
    """20 photos labeled, then 3 of them changed (mtime) and labeled again: 23 rows."""
    tmp_path = tmp_path_factory.mktemp("relabeled")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in originals.glob("*.jpg"):
        (inputs / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    assert run_cli(["label", inputs, out, "--part-size", "4"], cli_env).returncode == 0
    changed = sorted(inputs.glob("*.jpg"))[:3]
    for p in changed:
        os.utime(p, ns=(time.time_ns(), time.time_ns()))
    again = run_cli(["label", inputs, out, "--json"], cli_env)
    assert read_summary(again)["labeled"] == 3  # a changed file is labeled again
    return inputs, out, {p.name for p in changed}


@pytest.fixture
def relabeled(relabeled_once, tmp_path):
    """A private copy of relabeled_once (file times kept, so the done set still matches)."""
    inputs, out, changed = relabeled_once
    shutil.copytree(inputs, tmp_path / "in")
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "in", tmp_path / "out", changed


def test_compact_keeps_the_latest_row_of_each_image_like_the_documented_query(cli, relabeled):
    inputs, out, changed = relabeled
    before = latest(out)
    assert len(labeled_rows(out)) == 23 and len(before) == 20
    newest_run = sorted(before.run_id)[-1]
    assert set(before[before.run_id == newest_run].image_id) == changed
    proc = cli("compact", out, "--part-size", "8")
    assert proc.returncode == 0, proc.stderr
    assert "23 -> 20 rows" in proc.stderr
    rows = labeled_rows(out)
    assert len(rows) == 20 and rows.image_id.is_unique
    assert key(rows) == key(before)  # the same rows, untouched: run_id and labeled_at kept
    assert len(list(out.glob("part-*.parquet"))) == 3
    assert not [n for n in os.listdir(out) if n.startswith(("_tmp", "_staged", "_compact"))]
    assert read_summary(cli("label", inputs, out, "--json"))["labeled"] == 0  # still done
    assert "nothing to compact" in cli("compact", out, "--part-size", "8").stderr


def kill_compact_on(cli_env, out, tmp_path, mask, prefix):
    """Run `pipeline compact`, SIGKILL it the moment inotify reports `prefix` appearing."""
    watch = chaos.DirWatch(out)
    log = open(tmp_path / "compact.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "compact", str(out),
                             "--part-size", "2"], env=cli_env, stdout=log, stderr=log)
    killed = False
    try:
        while proc.poll() is None and not killed:
            for m, name in watch.events(0.2):
                if m & mask and name.startswith(prefix):
                    killed = chaos._kill(proc)
                    break
    finally:
        watch.close()
        log.close()
    proc.wait(60)
    return killed


def test_a_compaction_killed_while_writing_is_rolled_back(cli, cli_env, relabeled, tmp_path):
    inputs, out, _ = relabeled
    rows_before = key(labeled_rows(out))
    assert kill_compact_on(cli_env, out, tmp_path, chaos.IN_CREATE, "_tmp-_staged-")
    assert key(labeled_rows(out)) == rows_before  # readers see exactly the old parts
    assert list(out.glob("_compact-*.json"))
    proc = cli("label", inputs, out, "--json")  # any start recovers
    assert proc.returncode == 0 and read_summary(proc)["labeled"] == 0
    assert key(labeled_rows(out)) == rows_before
    assert not [n for n in os.listdir(out) if n.startswith(("_tmp", "_staged", "_compact"))]


def test_a_compaction_killed_while_swapping_is_finished_by_the_next_start(cli, cli_env, relabeled,
                                                                          tmp_path):
    inputs, out, _ = relabeled
    answer = key(latest(out))
    assert kill_compact_on(cli_env, out, tmp_path, chaos.IN_MOVED_TO, "part-")
    assert key(latest(out)) == answer  # duplicates may show for now, the answer is complete
    proc = cli("compact", out)
    assert proc.returncode == 0, proc.stderr
    rows = labeled_rows(out)
    assert len(rows) == 20 and key(rows) == answer
    assert not [n for n in os.listdir(out) if n.startswith(("_tmp", "_staged", "_compact"))]


def test_compact_refuses_while_an_overwrite_is_unfinished(tmp_path):
    from pipeline import store
    from pipeline.compact import compact
    from pipeline.exitcodes import ConfigError
    from pipeline.store.replace import start_overwrite

    start_overwrite(store.open_output(str(tmp_path)), "m", "r1")
    with pytest.raises(ConfigError, match="unfinished"):
        compact(str(tmp_path))


# ---- incremental: only the new parts and the files they supersede rows of ---------------------

def compaction_record(out):
    """The newest compaction's manifest in _runs/."""
    import json

    runs = sorted(p for p in (out / "_runs").glob("*.json")
                  if json.loads(p.read_text()).get("kind") == "compact")
    return json.loads(runs[-1].read_text())


def test_a_nightly_compaction_rewrites_only_the_new_part_and_the_file_it_supersedes(cli, relabeled):
    inputs, out, _ = relabeled
    assert cli("compact", out, "--part-size", "4").returncode == 0  # 20 rows in 5 files of 4
    compacted = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert len(compacted) == 5
    changed = sorted(inputs.glob("*.jpg"))[9]  # in the 3rd file: ids are sorted across files
    os.utime(changed, ns=(time.time_ns(), time.time_ns()))
    assert read_summary(cli("label", inputs, out, "--json"))["labeled"] == 1
    answer = key(latest(out))

    proc = cli("compact", out, "--part-size", "4")
    assert proc.returncode == 0, proc.stderr
    record = compaction_record(out)
    assert record["files_rewritten"] == 2  # the new part and the one file holding that image
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    kept = {n for n in compacted if after.get(n) == compacted[n]}
    assert len(kept) == 4  # four compacted files were not touched
    rows = labeled_rows(out)
    assert len(rows) == 20 and rows.image_id.is_unique and key(rows) == answer


def test_a_kill_during_a_nightly_compaction_loses_and_duplicates_nothing(cli, cli_env, relabeled,
                                                                         tmp_path):
    inputs, out, _ = relabeled
    assert cli("compact", out, "--part-size", "4").returncode == 0
    for p in sorted(inputs.glob("*.jpg"))[::3]:  # rows superseded in every compacted file
        os.utime(p, ns=(time.time_ns(), time.time_ns()))
    assert read_summary(cli("label", inputs, out, "--json"))["labeled"] == 7
    answer, raw = key(latest(out)), key(labeled_rows(out))
    assert kill_compact_on(cli_env, out, tmp_path, chaos.IN_CREATE, "_tmp-_staged-")
    assert key(labeled_rows(out)) == raw  # the old files answer, untouched
    assert kill_compact_on(cli_env, out, tmp_path, chaos.IN_MOVED_TO, "part-")
    assert key(latest(out)) == answer  # mid-swap: complete (identical duplicates at most)
    assert read_summary(cli("label", inputs, out, "--json"))["labeled"] == 0
    assert cli("compact", out).returncode == 0
    rows = labeled_rows(out)
    assert len(rows) == 20 and key(rows) == answer


def test_undersized_compacted_files_merge_once_four_of_a_size_have_gathered():
    from pipeline.compact import PartInfo, plan

    def compacted(name, rows):
        return PartInfo(f"/o/part-{name}.parquet", rows, rows * 100,
                        {b"pipeline.model": b"m", b"pipeline.compaction": name.encode()}, True, "m")

    big = [compacted(f"a{i}", 1000) for i in range(3)]
    small = [compacted(f"b{i}", 40 + i) for i in range(3)]  # 4**2 <= rows < 4**3
    assert plan(big + small, 1000, full=False) == []
    fourth = compacted("b3", 60)
    assert {i.path for i in plan(big + small + [fourth], 1000, full=False)} == {
        i.path for i in small + [fourth]}
    other_model = PartInfo("/o/part-b4.parquet", 50, 5000, {b"pipeline.model": b"n",
                           b"pipeline.compaction": b"b4"}, True, "n")
    assert plan(big + small + [other_model], 1000, full=False) == []  # never across identities
    assert len(plan(big + small, 1000, full=True)) == 6


# ---- S3: staged objects, a conditional commit, server-side copies; real kills -----------------

def s3_keys(s3, prefix="out/"):
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))


def s3_output(s3, out):
    """The local relabeled OUTPUT uploaded as s3://bucket/out/ (its parts and _runs/)."""
    from conftest import upload_dir

    upload_dir(s3.client, s3.bucket, out, "out")
    return f"s3://{s3.bucket}/out/"


def s3_current(s3):
    from conftest import read_s3_rows

    rows = read_s3_rows(s3.fs, f"s3://{s3.bucket}/out/")
    return rows.sort_values(["image_id", "labeled_at"]).groupby("image_id").tail(1), rows


def kill_s3_compact_when(cli_env, s3, seen, tmp_path) -> bool:
    """Run `pipeline compact` on the S3 OUTPUT; SIGKILL it as soon as a listing shows a key
    for which seen(keys) is true."""
    log = open(tmp_path / "compact-s3.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "compact", f"s3://{s3.bucket}/out/",
                             "--part-size", "2"], env={**cli_env, **s3.env}, stdout=log, stderr=log)
    killed = False
    try:
        while proc.poll() is None and not killed:
            if seen(s3_keys(s3)):
                killed = chaos._kill(proc)
    finally:
        log.close()
    proc.wait(60)
    return killed


def test_compact_on_s3_keeps_the_latest_row_and_leaves_no_marker(cli_env, relabeled, s3):
    _, out, _ = relabeled
    answer = key(latest(out))
    uri = s3_output(s3, out)
    proc = run_cli(["compact", uri, "--part-size", "8"], {**cli_env, **s3.env})
    assert proc.returncode == 0, proc.stderr
    assert "23 -> 20 rows" in proc.stderr
    _, rows = s3_current(s3)
    assert len(rows) == 20 and rows.image_id.is_unique and key(rows) == answer
    names = [k.split("/", 1)[1] for k in s3_keys(s3)]
    assert len([n for n in names if n.startswith("part-")]) == 3
    assert not [n for n in names if n.startswith(("_staged", "_compact", "_lock"))]


@pytest.mark.parametrize("moment", ["marker", "staged", "swap"])
def test_a_kill_during_an_s3_compaction_loses_and_duplicates_nothing(cli_env, relabeled, s3,
                                                                    tmp_path, moment):
    _, out, _ = relabeled
    answer = key(latest(out))
    uri = s3_output(s3, out)
    old = {k for k in s3_keys(s3) if "/part-" in k}
    seen = {"marker": lambda ks: any("/_compact-" in k for k in ks),
            "staged": lambda ks: any("/_staged-" in k for k in ks),
            "swap": lambda ks: any("/part-" in k and k not in old for k in ks)}[moment]
    assert kill_s3_compact_when(cli_env, s3, seen, tmp_path)
    current, rows = s3_current(s3)
    assert key(current) == answer  # every image answered for, by its latest row
    if moment != "swap":
        assert {k for k in s3_keys(s3) if "/part-" in k} == old  # the old parts, untouched
    proc = run_cli(["compact", uri], {**cli_env, **s3.env})  # the rerun recovers, then compacts
    assert proc.returncode == 0, proc.stderr
    current, rows = s3_current(s3)
    assert len(rows) == 20 and rows.image_id.is_unique and key(rows) == answer
    assert not [k for k in s3_keys(s3) if "/_staged" in k or "/_compact" in k or k.endswith("_lock")]


WIDTH = 1280


def embedding_part(path, ids, labeled_at, vectors):
    """A part of an --embeddings run in the writer's schema and file metadata."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.writer import part_schema

    n = len(ids)
    meta = {"pipeline.model": "m", "pipeline.weights_sha256": "w", "pipeline.top_k": "5"}
    schema = part_schema(WIDTH).with_metadata(meta)
    columns = {"image_id": pa.array(ids), "uri": pa.array(ids), "status": pa.array(["ok"] * n),
               "model": pa.array(["m"] * n), "run_id": pa.array([path.stem] * n),
               "labeled_at": pa.array([dt.datetime(2025, 1, labeled_at, tzinfo=dt.timezone.utc)] * n,
                                      pa.timestamp("us", tz="UTC")),
               "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), WIDTH)}
    pq.write_table(pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in schema},
                            schema=schema), path)


def test_embeddings_far_bigger_than_the_duckdb_memory_limit_compact_and_stream(cli_env, tmp_path,
                                                                              monkeypatch):
    """56 MB of embeddings under a 16 MB DuckDB limit (DuckDB's ORDER BY failed: 'failed to
    pin block', exit 4): latest_batches and compact give each image's newest row and vector."""
    import numpy as np
    import pyarrow.parquet as pq

    import pipeline
    from pipeline import rowstream

    rng = np.random.default_rng(0)
    out = tmp_path / "out"
    out.mkdir()
    ids = np.array([f"img{i:06d}" for i in rng.permutation(20_000)])  # parts span every id
    vectors = rng.standard_normal((20_000, WIDTH)).astype(np.float16)
    for p in range(5):
        rows = slice(p * 4000, (p + 1) * 4000)
        embedding_part(out / f"part-a{p}-00000.parquet", ids[rows], 1, vectors[rows])
    again = rng.choice(20_000, 2000, replace=False)
    newer = rng.standard_normal((2000, WIDTH)).astype(np.float16)
    embedding_part(out / "part-b0-00000.parquet", ids[again], 2, newer)
    expected = dict(zip(ids, vectors))
    expected.update(zip(ids[again], newer))

    def check(table):
        assert table.column("image_id").to_pylist() == sorted(expected)
        got = np.array(table.column("embedding").combine_chunks().flatten()).reshape(-1, WIDTH)
        assert np.array_equal(got, np.stack([expected[i] for i in sorted(expected)]))

    monkeypatch.setattr(rowstream, "MEMORY_LIMIT", "16MB")
    monkeypatch.setattr(rowstream, "SORT_MEMORY", 4 * 2**20, raising=False)  # new here
    check(pipeline.latest_batches(str(out), ["image_id", "embedding"]).read_all())
    env = {**cli_env, "PIPELINE_DUCKDB_MEMORY": "16MB", "PIPELINE_SORT_MEMORY_MB": "4"}
    proc = run_cli(["compact", out], env)
    assert proc.returncode == 0, proc.stderr
    assert "22000 -> 20000 rows" in proc.stderr
    check(pq.read_table(out, columns=["image_id", "embedding"]).sort_by("image_id"))
