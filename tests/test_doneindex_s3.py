"""The done index on an S3 OUTPUT (moto_server): saved under OUTPUT/_index/ through the store,
each array streamed into a private unnamed temporary file and memory-mapped on load, checked
like a local one (stale, damaged: rebuilt from the parts), the pointer's PUT fenced by the
lease, and a kill -9 at each step of an update leaving the old generation or the new one.
Through the real CLI: a night loads the index and labels exactly the new images, also after
damage, after a compaction (which the pointer follows) and after a SIGKILL between the arrays'
upload and the pointer's."""
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from pipeline import doneindex, doneset, store
from pipeline.store import layout
from pipeline.types import S3Options
from pipeline.writer import PartWriter

from conftest import ROOT, read_s3_rows, read_summary, run_cli
from test_doneindex import KILLED_UPDATE
from test_doneindex_cli import copy_new
from test_doneset import ME, ok_rows, ref, stamp

PREFIX = "labels/"


@pytest.fixture
def s3out(s3):
    """(s3, OUTPUT's URI, a fresh store of it) on a new bucket."""
    uri = f"s3://{s3.bucket}/{PREFIX}"
    return s3, uri, lambda: store.open_output(uri, S3Options(endpoint=s3.server.endpoint))


def archive(o, names, run_id="r1"):
    w = PartWriter(o, run_id, part_size=7, metadata=ME.metadata())  # several parts per run
    w.add(ok_rows([ref(n) for n in names], stamp(run_id)))
    w.commit()


def night(o, identity=ME):
    """A run's start and end: the done set (index or parts), then the index saved."""
    done, basis = doneindex.done_set(o, identity)
    doneindex.refresh(o, identity, basis)
    return done


def keys_under(s3, prefix):
    listing = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def index_keys(s3):
    return keys_under(s3, PREFIX + "_index/")


def part_keys(s3):
    return keys_under(s3, PREFIX + "part-")


def get(s3, key):
    return s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()


def put(s3, key, data):
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=data)


def test_an_index_saved_on_s3_is_memory_mapped_from_unnamed_temp_files(s3out, tmp_path,
                                                                        monkeypatch):
    s3, uri, opened = s3out
    monkeypatch.setattr(doneset, "HASH_BITS", 2)  # every lookup meets collisions
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # TMPDIR
    archive(opened(), [f"a/{i}.jpg" for i in range(50)])
    night(opened())
    keys = index_keys(s3)
    assert PREFIX + "_index/done.json" in keys and len(keys) == 6 + 1
    pointer = doneindex.pointer_json(opened())
    assert [n for n, _ in pointer["covered"]] == [k[len(PREFIX):] for k in part_keys(s3)]
    loaded, basis = doneindex.done_set(opened(), ME)
    assert basis.saved and isinstance(loaded._keys, np.memmap)
    assert os.listdir(scratch) == []  # the downloads have no name: nothing to leave behind
    probes = [ref(f"a/{i}.jpg") for i in range(60)] + [ref("a/1.jpg", size=7)]
    assert loaded.check(probes)[0].tolist() == [True] * 50 + [False] * 11
    mapped = {"keys": loaded._keys, "size": loaded._size, "mtime": loaded._mtime,
              "code": loaded._code, "id_data": loaded._ids.data, "id_offsets": loaded._ids.offsets}
    for field, entry in pointer["files"].items():  # what was mapped is the object on S3
        saved = np.load(io.BytesIO(get(s3, PREFIX + entry["name"])))
        assert saved.dtype == mapped[field].dtype and np.array_equal(saved, mapped[field])


def test_the_next_night_merges_only_the_new_parts(s3out, caplog):
    s3, uri, opened = s3out
    caplog.set_level(logging.INFO)
    archive(opened(), ["a.jpg", "b.jpg"], "r1")
    night(opened())
    first = doneindex.pointer_json(opened())["files"]["keys"]["name"]
    archive(opened(), ["c.jpg", "a.jpg"], "r2")
    caplog.clear()
    done = night(opened())
    assert "merged in" in caplog.text and "not used" not in caplog.text
    assert done.check([ref(n) for n in ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]])[0].tolist() == [
        True, True, True, False]
    pointer = doneindex.pointer_json(opened())
    assert pointer["files"]["keys"]["name"] != first
    assert [n for n, _ in pointer["covered"]] == [k[len(PREFIX):] for k in part_keys(s3)]
    assert len(index_keys(s3)) == 6 + 1  # the old generation is gone


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "pointer"])
def test_a_damaged_index_on_s3_is_detected_and_rebuilt(s3out, damage, caplog):
    s3, uri, opened = s3out
    caplog.set_level(logging.INFO)
    archive(opened(), [f"a/{i}.jpg" for i in range(20)])
    night(opened())
    pointer = doneindex.pointer_json(opened())
    key = PREFIX + pointer["files"]["keys"]["name"]
    data = get(s3, key)
    if damage == "truncate":
        put(s3, key, data[:-8])
    elif damage == "garbage":  # same length, other bytes: the last key says "done" for others
        put(s3, key, data[:-8] + b"\xff" * 8)
    elif damage == "delete":
        s3.client.delete_object(Bucket=s3.bucket, Key=key)
    else:
        put(s3, PREFIX + "_index/done.json", b"{not json")
    o = opened()
    assert doneindex.load(o, ME, o.data_files()) is None
    assert "done index not used" in caplog.text
    done = night(opened())
    assert done.check([ref("a/3.jpg"), ref("a/30.jpg")])[0].tolist() == [True, False]
    o = opened()
    assert doneindex.load(o, ME, o.data_files()) is not None  # the rebuilt one was saved
    assert len(index_keys(s3)) == 6 + 1


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_a_stale_index_on_s3_is_rebuilt_from_the_parts(s3out, change, caplog):
    s3, uri, opened = s3out
    caplog.set_level(logging.INFO)
    archive(opened(), ["a.jpg", "b.jpg"], "r1")
    archive(opened(), ["c.jpg"], "r2")
    night(opened())
    first = [k for k in part_keys(s3) if "/part-r1-" in k][0]
    if change == "deleted":  # what a compaction does to the parts it replaces
        s3.client.delete_object(Bucket=s3.bucket, Key=first)
        want = [False, False, True]
    else:  # another part under the same name: a covered file with another size
        archive(store.open_output(f"s3://{s3.bucket}/other/",
                                  S3Options(endpoint=s3.server.endpoint)), ["a.jpg"], "r1")
        put(s3, first, get(s3, [k for k in keys_under(s3, "other/part-")][0]))
        want = [True, False, True]
    done = night(opened())
    assert "done index not used: a data file it covers is gone or changed size (stale)" \
        in caplog.text
    assert done.check([ref("a.jpg"), ref("b.jpg"), ref("c.jpg")])[0].tolist() == want
    o = opened()
    assert doneindex.load(o, ME, o.data_files()).new == []


def test_a_run_whose_lease_was_taken_over_publishes_no_pointer(s3out):
    """The arrays are uploaded, then another run takes the lock over: the pointer's PUT is
    fenced (LeaseLost), the old generation stays the answer, the next save removes the
    orphaned arrays."""
    s3, uri, opened = s3out
    archive(opened(), ["a.jpg"], "r1")
    night(opened())
    before = get(s3, PREFIX + "_index/done.json")
    o = opened()
    real_write_json = o.write_json

    def taken_over_first(name, obj, fenced=True):
        if name == doneindex.POINTER:  # another run's lock, as a takeover writes it
            put(s3, PREFIX + layout.LOCK, b'{"pid": 1, "host": "elsewhere", "nonce": "x"}')
        real_write_json(name, obj, fenced)

    o.write_json = taken_over_first
    with o.lock("label", lease=600):
        done, basis = doneindex.done_set(o, ME)
        archive(o, ["b.jpg"], "r2")  # the run's own part
        with pytest.raises(store.LeaseLost):
            doneindex.refresh(o, ME, basis)
    assert get(s3, PREFIX + "_index/done.json") == before
    assert len(index_keys(s3)) == 6 + 6 + 1  # its arrays were uploaded while the lease was ours
    s3.client.delete_object(Bucket=s3.bucket, Key=PREFIX + layout.LOCK)
    done = night(opened())
    assert done.check([ref("a.jpg"), ref("b.jpg"), ref("c.jpg")])[0].tolist() == [True, True, False]
    assert len(index_keys(s3)) == 6 + 1


@pytest.mark.parametrize("phase", ["start", "end"])
@pytest.mark.parametrize("step", ["array", "pointer", "delete"])
def test_kill_9_at_each_step_of_an_s3_update_leaves_a_usable_index(s3out, step, phase):
    """test_doneindex's kill -9 at each step (after 3 of the 6 arrays are uploaded, after all 6
    before the pointer, after the pointer before the old generation is deleted), on S3."""
    s3, uri, opened = s3out
    archive(opened(), ["a.jpg", "b.jpg"])
    night(opened())
    old = doneindex.pointer_json(opened())["files"]["keys"]["name"]
    if phase == "start":
        archive(opened(), ["c.jpg"], "r2")
        archive(opened(), ["a.jpg"], "r3")  # a relabel: its old entry is superseded
    env = dict(os.environ, PYTHONPATH=ROOT, **s3.env)
    child = subprocess.Popen([sys.executable, "-c", KILLED_UPDATE, uri, step, str(ROOT), phase],
                             env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "stopped"  # waits for the event
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert len(index_keys(s3)) == {"array": 3 + 6 + 1, "pointer": 12 + 1, "delete": 12 + 1}[step]
    o = opened()
    assert (doneindex.pointer_json(o)["files"]["keys"]["name"] == old) == (step != "delete")
    loaded = doneindex.load(o, ME, o.data_files())
    assert loaded is not None and len(loaded.new) == (2 if step != "delete" else 0)
    probes = [ref("a.jpg"), ref("b.jpg"), ref("c.jpg"), ref("d.jpg")]
    assert night(opened()).check(probes)[0].tolist() == [True, True, True, False]
    assert night(opened()).check(probes)[0].tolist() == [True, True, True, False]
    assert len(index_keys(s3)) == 6 + 1  # the unreferenced objects are gone
    o = opened()
    assert doneindex.load(o, ME, o.data_files()).new == []


# -- through the real CLI ------------------------------------------------------------------


def covers_every_part(s3):
    pointer = doneindex.pointer_json(store.open_output(f"s3://{s3.bucket}/{PREFIX}",
                                                       S3Options(endpoint=s3.server.endpoint)))
    return [n for n, _ in pointer["covered"]] == [k[len(PREFIX):] for k in part_keys(s3)]


def assert_each_image_once(s3, uri, inputs):
    rows = read_s3_rows(s3.fs, uri)
    ids = sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*.jpg"))
    assert sorted(rows.image_id) == ids  # one row, so one latest row, per image
    assert set(rows.status) == {"ok"}


def label(uri, inputs, env, *extra, **kw):
    proc = run_cli(["label", inputs, uri, "--json", *extra], env, **kw)
    assert proc.returncode == 0, proc.stderr
    return proc, read_summary(proc)


def test_each_night_on_s3_loads_the_index_and_labels_exactly_the_new_images(s3out, cli_env,
                                                                              replicas):
    s3, uri, _ = s3out
    env, inputs = {**cli_env, **s3.env}, replicas(1)
    first, _ = label(uri, inputs, env)
    assert "done index" not in first.stderr  # none yet: nothing to say
    assert PREFIX + "_index/done.json" in index_keys(s3) and covers_every_part(s3)
    copy_new(inputs, 5, "new")
    second, summary = label(uri, inputs, env)
    assert (summary["labeled"], summary["skipped"]) == (5, 20)
    assert "done index used: 20 entries" in second.stderr and "not used" not in second.stderr
    assert covers_every_part(s3) and len(index_keys(s3)) == 6 + 1
    assert_each_image_once(s3, uri, inputs)


def test_a_damaged_index_on_s3_is_rebuilt_and_no_new_image_counts_as_done(s3out, cli_env,
                                                                            replicas):
    s3, uri, opened = s3out
    env, inputs = {**cli_env, **s3.env}, replicas(1)
    label(uri, inputs, env)
    key = PREFIX + doneindex.pointer_json(opened())["files"]["id_data"]["name"]
    data = get(s3, key)
    put(s3, key, data[:-20] + b"garbagegarba" + data[-8:])  # same length, other ids
    copy_new(inputs, 2, "new")
    after, summary = label(uri, inputs, env)
    assert "done index not used: it is damaged" in after.stderr
    assert (summary["labeled"], summary["skipped"]) == (2, 20)
    assert covers_every_part(s3) and len(index_keys(s3)) == 6 + 1
    assert_each_image_once(s3, uri, inputs)


def test_after_compaction_on_s3_the_index_covers_the_compacted_files(s3out, cli_env, replicas):
    s3, uri, _ = s3out
    env, inputs = {**cli_env, **s3.env}, replicas(1)
    label(uri, inputs, env, "--part-size", "4")
    parts = part_keys(s3)
    compact = run_cli(["compact", uri], env)
    assert compact.returncode == 0, compact.stderr
    assert not set(parts) & set(part_keys(s3))  # the covered parts were replaced
    assert covers_every_part(s3)  # the pointer followed them (its PUT through the store)
    copy_new(inputs, 3, "new")
    after, summary = label(uri, inputs, env)
    assert (summary["labeled"], summary["skipped"]) == (3, 20)
    assert "done index used: 20 entries" in after.stderr and "not used" not in after.stderr
    assert covers_every_part(s3)
    assert_each_image_once(s3, uri, inputs)


STOP_BEFORE_POINTER = """
import runpy, sys, time
from pipeline import doneindex
from pipeline.store import s3
real = s3.S3Store.write_file
def write_file(self, name, write, fenced=True):
    if name == doneindex.POINTER:  # every array of the new generation is uploaded
        print("stopped", flush=True)
        time.sleep(600)
    return real(self, name, write, fenced)
s3.S3Store.write_file = write_file
sys.argv = ["pipeline", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__")
"""


def test_a_cli_run_killed_between_the_arrays_and_the_pointer_on_s3(s3out, cli_env, replicas):
    """SIGKILL of the CLI at the end of a night, its parts committed and the new generation's
    arrays uploaded but not the pointer: the next night starts from the old generation, merges
    the killed run's parts, labels exactly the new images and deletes the orphaned arrays."""
    s3, uri, opened = s3out
    env, inputs = {**cli_env, **s3.env}, replicas(1)
    label(uri, inputs, env)
    old = doneindex.pointer_json(opened())
    copy_new(inputs, 4, "second")
    child = subprocess.Popen([sys.executable, "-c", STOP_BEFORE_POINTER, "label", str(inputs),
                              uri, "--progress", "none"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "stopped"  # waits for the event
    finally:
        os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert doneindex.pointer_json(opened()) == old
    assert len(index_keys(s3)) == 6 + 6 + 1 and not covers_every_part(s3)
    copy_new(inputs, 3, "third")
    after, summary = label(uri, inputs, env)
    assert (summary["labeled"], summary["skipped"]) == (3, 24)
    assert "done index used: 24 entries" in after.stderr  # the old 20 and the killed run's 4
    assert "1 new data file(s) merged in" in after.stderr
    assert "not used" not in after.stderr
    assert covers_every_part(s3) and len(index_keys(s3)) == 6 + 1
    assert_each_image_once(s3, uri, inputs)
