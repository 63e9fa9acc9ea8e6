"""The output store: the done set over it, the lock and crash recovery, on real parts written by
the real writer."""
import json
import os
import re
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import store
from pipeline.doneset import Identity, done_set
from pipeline.store import OutputLocked
from pipeline.store.latest import LATEST_QUALIFY, latest_query, latest_rows
from pipeline.store.layout import staged_name
from pipeline.store.parts import part_model
from pipeline.store.replace import (Replacement, recover, replacements, start_overwrite,
                                    unfinished_overwrite)
from pipeline.types import ErrorRecord, ImageRef, Labels
from pipeline.writer import PartWriter, RunStamp, error_table, prediction_table, write_part

T0 = 1_700_000_000_000_000_000


def at(path):
    return store.open_output(str(path))


def ref(i, size=100, mtime_ns=T0):
    return ImageRef(f"img{i}", f"/x/img{i}.jpg", size, mtime_ns)


def ok_rows(refs, stamp):
    n = len(refs)
    return prediction_table(refs, np.ones(n), np.ones(n), np.zeros((n, 1), int),
                            np.ones((n, 1), np.float32), stamp, Labels(("a",), ("alpha",)))


def commit(out, run_id, table, model="m"):
    """One run of `model` committing `table` as one part."""
    w = PartWriter(at(out), run_id, part_size=10_000, metadata={"pipeline.model": model})
    w.add(table)
    w.commit()
    return w.committed_parts


def stamp(run_id, model="m"):
    return RunStamp(model, run_id)


def test_the_latest_row_decides_and_only_transient_errors_are_retried(tmp_path):
    s1, s2 = stamp("r1"), stamp("r2")
    commit(tmp_path, "r1", pa.concat_tables([
        ok_rows([ref(0), ref(3)], s1),
        error_table([ErrorRecord(ref(1), "not_found", "gone"), ErrorRecord(ref(2), "corrupt", "bad"),
                     ErrorRecord(ref(4), "not_found", "gone")], s1)]))
    commit(tmp_path, "r2", pa.concat_tables([
        error_table([ErrorRecord(ref(3), "unreadable", "EIO")], s2), ok_rows([ref(4)], s2)]))
    done = done_set(at(tmp_path), Identity("m"))
    # 1 and 3: the latest row is a transient error
    assert done.check([ref(i) for i in range(5)])[0].tolist() == [True, False, True, False, True]


def test_a_changed_size_or_mtime_is_not_done(tmp_path):
    commit(tmp_path, "r1", ok_rows([ref(0)], stamp("r1")))
    done = done_set(at(tmp_path), Identity("m"))
    probes = [ref(0), ref(0, size=101), ref(0, mtime_ns=T0 + 1000), ref(1)]
    assert done.check(probes)[0].tolist() == [True, False, False, False]


def test_other_models_and_replaced_parts_do_not_count(tmp_path):
    commit(tmp_path, "r1", ok_rows([ref(0)], stamp("r1", "other")), model="other")
    (old,) = commit(tmp_path, "r2", ok_rows([ref(1)], stamp("r2")))
    commit(tmp_path, "r3", ok_rows([ref(2)], stamp("r3")))
    probes = [ref(i) for i in range(3)]
    m = Identity("m")
    assert done_set(at(tmp_path), m).check(probes)[0].tolist() == [False, True, True]
    assert done_set(at(tmp_path), m, ignore=frozenset([old])).check(
        probes)[0].tolist() == [False, False, True]
    assert part_model(at(tmp_path), old) == "m"


def test_latest_rows_is_the_documented_duckdb_query(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    for run in ("r1", "r2", "r3"):  # overlapping runs: img2..img4 labeled up to three times
        start = int(run[1]) + 1
        size = 100 + start  # each run saw another size: the done set must pick the same row
        commit(tmp_path, run, ok_rows([ref(i, size) for i in range(start, start + 3)], stamp(run)))
    table = pq.read_table(tmp_path)
    ours = table.take(latest_rows(table)).select(["image_id", "run_id"]).to_pylist()
    theirs = duckdb.sql(latest_query(f"'{tmp_path}/part-*.parquet'").replace(
        "SELECT *", "SELECT image_id, run_id")).fetchall()
    assert sorted((r["image_id"], r["run_id"]) for r in ours) == sorted(theirs)
    assert dict(theirs) == {"img2": "r1", "img3": "r2", "img4": "r3", "img5": "r3", "img6": "r3"}
    sizes = {f"img{i}": 100 + int(run[1]) + 1 for i, run in
             [(2, "r1"), (3, "r2"), (4, "r3"), (5, "r3"), (6, "r3")]}
    probes = [ref(int(i[3:]), size) for i, size in sizes.items()] + [ref(4, 102), ref(3, 102)]
    assert done_set(at(tmp_path), Identity("m")).check(probes)[0].tolist() == [True] * 5 + [False] * 2


def test_the_docs_state_the_latest_row_rule_as_the_code_does():
    from conftest import LATEST, ROOT

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    clauses = [c for doc in docs for c in re.findall(r"QUALIFY[^\n]*?= 1", doc.read_text())]
    assert len(clauses) > 3 and set(clauses) == {LATEST_QUALIFY}, set(clauses)
    assert LATEST_QUALIFY in LATEST


def test_the_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with at(tmp_path).lock():
        holder = json.loads((tmp_path / "_lock").read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "label"
        with pytest.raises(OutputLocked) as e:
            with at(tmp_path).lock("compact"):
                pass
        assert f"pid {os.getpid()} on host {socket.gethostname()}, started {holder['started']}" \
            in str(e.value)
    with at(tmp_path).lock():  # released on exit
        pass


def test_the_lock_holds_when_its_file_is_deleted_and_the_message_names_no_file(tmp_path):
    with at(tmp_path).lock():
        (tmp_path / "_lock").unlink()
        with pytest.raises(OutputLocked) as e:
            with at(tmp_path).lock():
                pass
        assert "_lock" not in str(e.value) and "wait for it to finish" in str(e.value)
    with at(tmp_path).lock():
        assert json.loads((tmp_path / "_lock").read_text())["pid"] == os.getpid()


def parts_and_rows(out):
    names = sorted(p.name for p in out.glob("part-*.parquet"))
    return names, sorted(pq.read_table(out / n).column("image_id").to_pylist()[0] for n in names)


def test_recover_rolls_back_a_compaction_killed_before_it_committed(tmp_path):
    old = commit(tmp_path, "r1", ok_rows([ref(0)], stamp("r1")))
    before = parts_and_rows(tmp_path)
    rep = Replacement(at(tmp_path), "compact", "c1", None, old, ["part-c1-00000.parquet"])
    rep.save()  # the state a kill leaves while the compacted part is being staged:
    write_part(at(tmp_path), staged_name("part-c1-00000.parquet"), ok_rows([ref(0)], stamp("r1")))
    (tmp_path / "_tmp-part-c1-00001.parquet.tmp").write_bytes(b"half")
    notes = recover(at(tmp_path))
    assert parts_and_rows(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == sorted(old)
    assert any("rolled back" in n for n in notes) and any("temp" in n for n in notes)


def test_recover_finishes_a_swap_killed_half_way(tmp_path):
    old = commit(tmp_path, "r1", ok_rows([ref(0)], stamp("r1"))) + \
        commit(tmp_path, "r2", ok_rows([ref(1)], stamp("r2")))
    new = ["part-c1-00000.parquet", "part-c1-00001.parquet"]
    rep = Replacement(at(tmp_path), "compact", "c1", None, old, new, state="commit")
    rep.save()
    for i, name in enumerate(new):
        write_part(at(tmp_path), staged_name(name), ok_rows([ref(i)], stamp(f"r{i + 1}")))
    os.replace(tmp_path / staged_name(new[0]), tmp_path / new[0])  # killed after one rename
    recover(at(tmp_path))
    assert parts_and_rows(tmp_path) == (new, ["img0", "img1"])
    assert not [n for n in os.listdir(tmp_path) if n.startswith("_")]


def test_recover_leaves_an_unfinished_overwrite_and_completes_a_committed_one(tmp_path):
    old = commit(tmp_path, "r1", ok_rows([ref(0)], stamp("r1")))
    rep = start_overwrite(at(tmp_path), "m", "r2")
    assert rep.remove == old
    commit(tmp_path, "r2", ok_rows([ref(0)], stamp("r2")))
    recover(at(tmp_path))
    assert unfinished_overwrite(at(tmp_path), "m").remove == old
    assert unfinished_overwrite(at(tmp_path), "other") is None
    rep.state = "commit"
    rep.save()  # killed right after marking it committed
    recover(at(tmp_path))
    assert parts_and_rows(tmp_path)[1] == ["img0"]
    assert not (tmp_path / old[0]).exists() and replacements(at(tmp_path)) == []


def test_check_writable_is_an_output_error(tmp_path):
    from pipeline.store import OutputError

    at(tmp_path).check_writable()
    with pytest.raises(OutputError, match="not writable"):
        at(tmp_path / "missing").check_writable()


def test_s3_lock_is_exclusive_and_its_heartbeat_keeps_it_past_the_lease(s3):
    """A lock is stale `lease` s after the object's Last-Modified by S3's clock: once that clock
    is past the first write's lease, only the heartbeat's rewrites keep the lock."""
    from conftest import s3_clock, wait_until_s3_age
    from pipeline.types import S3Options

    s3_options = S3Options(endpoint=s3.server.endpoint)
    out = f"s3://{s3.bucket}/out"

    def holder():
        return json.loads(s3.client.get_object(Bucket=s3.bucket, Key="out/_lock")["Body"].read())

    with store.open_output(out, s3_options).lock(lease=3.0):  # refreshed every 0.3 s
        held, (_, written) = holder(), s3_clock(s3.client, s3.bucket, "out/_lock")
        assert (held["pid"], held["host"]) == (os.getpid(), socket.gethostname())
        wait_until_s3_age(s3.client, s3.bucket, "out/_lock", older_than=3.0, since=written)
        assert "refreshed" in holder()
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()} on host"):
            with store.open_output(out, s3_options).lock(lease=3.0):
                pass
    assert "Contents" not in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="out/")


def test_s3_lock_of_another_host_is_taken_over_once_its_lease_ran_out_and_not_before(s3):
    from conftest import wait_until_s3_age
    from pipeline.types import S3Options

    s3_options = S3Options(endpoint=s3.server.endpoint)
    out = f"s3://{s3.bucket}/out"
    elsewhere = {"pid": 1, "host": "some-other-host", "started": "2026-01-01T00:00:00+00:00"}
    s3.client.put_object(Bucket=s3.bucket, Key="out/_lock", Body=json.dumps(elsewhere).encode())
    with pytest.raises(OutputLocked, match="pid 1 on host some-other-host.*stale after 60 s"):
        with store.open_output(out, s3_options).lock(lease=60.0):
            pass
    wait_until_s3_age(s3.client, s3.bucket, "out/_lock", older_than=1.0)
    with store.open_output(out, s3_options).lock(lease=1.0):
        held = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="out/_lock")["Body"].read())
        assert (held["pid"], held["host"]) == (os.getpid(), socket.gethostname())
