"""The persisted done index: saved beside the parts, memory-mapped on load, merged with only the
data files committed since, and never used when it is stale (a covered data file gone or
resized), damaged (truncated or garbage files), of another identity or hash width; a kill -9 at
any step of its update leaves a usable index. Answers are checked against the rule stated in
plain Python (test_doneset.expected), with the hash narrowed so that collisions are everywhere."""
import datetime as dt
import logging
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline import doneindex, donemerge, doneset, store
from pipeline.doneset import Identity
from pipeline.store import layout
from pipeline.types import ErrorRecord
from pipeline.writer import error_table

from test_doneset import ME, PERMANENT, TRANSIENT, T0, at, commit, expected, ok_rows, ref, stamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER = Identity("m", "sha-B", "pre", "litert", "float32")


def archive(out, names, run_id="r1"):
    commit(out, run_id, ok_rows([ref(n) for n in names], stamp(run_id)), ME.metadata())


def night(out, identity=ME):
    """A run's start and end: the done set (index or parts), then the index saved."""
    o = store.open_output(str(out))
    done, basis = doneindex.done_set(o, identity)
    doneindex.refresh(o, identity, basis)
    return done


def generation(out):
    return doneindex.pointer_json(store.open_output(str(out)))["files"]["keys"]["name"]


def test_a_saved_index_is_memory_mapped_and_answers_like_the_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(doneset, "HASH_BITS", 2)  # every lookup meets collisions
    archive(tmp_path, [f"a/{i}.jpg" for i in range(50)])
    night(tmp_path)
    o = store.open_output(str(tmp_path))
    loaded, basis = doneindex.done_set(o, ME)
    assert basis.saved and isinstance(loaded._keys, np.memmap)
    probes = [ref(f"a/{i}.jpg") for i in range(60)] + [ref("a/1.jpg", size=7)]
    is_done, _ = loaded.check(probes)
    assert is_done.tolist() == [True] * 50 + [False] * 11


class Archive:
    """Runs of two identities over overlapping ids, committed a few at a time: ok rows, transient
    and permanent errors, changed files, labeled_at ties across runs (and so across merges)."""

    def __init__(self, out, rng, n_ids):
        self.out, self.rng, self.rows, self.runs = out, rng, [], 0
        self.names = [f"dir{rng.randrange(3)}/img{i:05d}.jpg" for i in range(n_ids)]

    def run(self, when=None, run_id=None):
        rng, run = self.rng, self.runs
        self.runs += 1
        identity = OTHER if run % 3 == 1 else ME
        st = stamp(run_id or f"r{run:03d}")
        chosen = rng.sample(self.names, rng.randrange(1, len(self.names)))
        refs = [ref(n, size=rng.choice([100] * 5 + [101]), mtime_ns=T0 + rng.choice([0] * 5 + [1000]))
                for n in chosen]
        kinds = [rng.choice(["ok", "ok", "ok"] + TRANSIENT + sorted(PERMANENT)) for _ in refs]
        oks = [r for r, k in zip(refs, kinds) if k == "ok"]
        errs = [ErrorRecord(r, k, "msg") for r, k in zip(refs, kinds) if k != "ok"]
        when = when or dt.datetime(2025, 1, 1 + run // 2, tzinfo=dt.timezone.utc)  # pairs tie
        table = pa.concat_tables([at(ok_rows(oks, st), when), at(error_table(errs, st), when)])
        commit(self.out, st.run_id, table, identity.metadata())
        rows = [{**row, "mtime": int(row["mtime"].timestamp() * 1e6), "scores": identity}
                for row in table.to_pylist()]
        self.rows = sorted(self.rows + [(st.run_id, i, r) for i, r in enumerate(rows)],
                           key=lambda x: (x[0], x[1]))  # dataset order: files by name

    def listing(self):
        rng = self.rng
        refs = [ref(n, size=rng.choice([100] * 6 + [101, None]),
                    mtime_ns=T0 + rng.choice([0] * 6 + [1000])) for n in self.names]
        return refs + [ref(f"dir0/new{i}.jpg") for i in range(20)] + \
            [ref(n + "x") for n in self.names[:10]]

    def check(self, done, listing=None):
        listing = listing or self.listing()
        want_done, want_previous = expected([r for _, _, r in self.rows], ME, listing)
        is_done, previous = done.check(listing)
        assert is_done.tolist() == want_done
        assert previous == want_previous
        return sum(want_done)


@pytest.mark.parametrize("bits, chunk", [(64, 1 << 20), (4, 1 << 20), (1, 1 << 20), (4, 3)])
def test_nightly_merges_agree_with_the_rule_even_when_every_hash_collides(tmp_path, monkeypatch,
                                                                           bits, chunk, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(doneset, "HASH_BITS", bits)
    monkeypatch.setattr(donemerge, "CHUNK", chunk)  # arrays streamed a few values at a time
    monkeypatch.setattr(doneindex, "MAX_SUPERSEDED", 1.0)  # merges only: no rebuild for churn
    a = Archive(tmp_path, random.Random(bits), 80)
    generations, done_counts = set(), []
    for _ in range(10):
        for _ in range(a.rng.randrange(1, 3)):
            a.run()
        done, listing = night(tmp_path), a.listing()
        done_counts.append(a.check(done, listing))
        generations.add(generation(tmp_path))
        assert a.check(night(tmp_path), listing) == done_counts[-1]  # nothing new: as saved
    assert len(generations) == 10
    assert "building the done set from the parts" not in caplog.text  # every night merged
    assert max(done_counts) > 10 and min(done_counts) < len(a.names)
    o = store.open_output(str(tmp_path))
    pointer = doneindex.pointer_json(o)
    assert [n for n, _ in pointer["covered"]] == [f.name for f in o.data_files()]


def test_rows_older_than_the_index_or_tied_in_an_earlier_file_are_not_merged(tmp_path, caplog,
                                                                               monkeypatch):
    """A clock set back, or a file that sorts before the covered ones with the same labeled_at:
    the latest-row rule needs the covered rows, so the done set is built from the parts."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(doneindex, "MAX_SUPERSEDED", 1.0)
    a = Archive(tmp_path, random.Random(7), 60)
    a.run(when=dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc), run_id="r5")
    a.run(when=dt.datetime(2025, 3, 2, tzinfo=dt.timezone.utc), run_id="r6")
    a.check(night(tmp_path))
    for when, run_id in [(dt.datetime(2025, 2, 1, tzinfo=dt.timezone.utc), "r7"),  # older
                         (dt.datetime(2025, 3, 3, tzinfo=dt.timezone.utc), "r8"),
                         (dt.datetime(2025, 3, 2, 12, tzinfo=dt.timezone.utc), "r9"),  # < r8
                         (dt.datetime(2025, 3, 3, tzinfo=dt.timezone.utc), "r0")]:  # tie, before
        caplog.clear()
        a.run(when=when, run_id=run_id)
        a.check(night(tmp_path))
        assert ("not newer than the index's newest" in caplog.text) == (run_id != "r8")
        assert ("building the done set from the parts" in caplog.text) == (run_id != "r8")
        a.check(night(tmp_path))  # and the index saved after it answers the same


def test_a_new_image_is_never_done_after_merges_with_a_1_bit_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(doneset, "HASH_BITS", 1)
    archive(tmp_path, [f"a/{i}.jpg" for i in range(300)], "r1")
    night(tmp_path)
    archive(tmp_path, [f"b/{i}.jpg" for i in range(300)], "r2")
    done = night(tmp_path)
    assert doneindex.pointer_json(store.open_output(str(tmp_path)))["hash_bits"] == 1
    labeled = [ref(f"a/{i}.jpg") for i in range(300)] + [ref(f"b/{i}.jpg") for i in range(300)]
    new = [ref(f"a/{i}.jpg") for i in range(300, 600)] + [ref(f"c/{i}.jpg") for i in range(300)]
    is_done, _ = done.check(labeled + new)
    assert is_done[:600].all() and not is_done[600:].any()


def test_a_stale_index_is_rebuilt_from_the_parts(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    archive(tmp_path, ["a.jpg", "b.jpg"])
    archive(tmp_path, ["c.jpg"], "r2")
    night(tmp_path)
    o = store.open_output(str(tmp_path))
    first = [f for f in o.data_files() if f.name.startswith("part-r1-")][0]
    os.unlink(o.uri(first.name))  # a covered part deleted (what a compaction does)
    done = night(tmp_path)
    assert "changed size (stale)" in caplog.text
    assert done.check([ref("a.jpg"), ref("b.jpg"), ref("c.jpg")])[0].tolist() == [False, False, True]
    caplog.clear()
    with open(o.uri(o.data_files()[0].name), "ab") as f:  # a covered part with another size
        f.write(b"\0")
    assert doneindex.load(o, ME, o.data_files()) is None
    assert "stale" in caplog.text


def test_after_a_compaction_the_index_covers_the_compacted_files_and_answers_the_same(
        tmp_path, monkeypatch, caplog):
    """Nights, a compaction, more nights and a nightly compaction: the index is never rebuilt,
    its answers follow the rule over every row ever written, and the pointer names exactly the
    data files left."""
    from pipeline import compact

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(doneset, "HASH_BITS", 4)
    monkeypatch.setattr(doneindex, "MAX_SUPERSEDED", 1.0)
    a = Archive(tmp_path, random.Random(11), 120)
    o = store.open_output(str(tmp_path))
    for _ in range(3):
        for _ in range(3):
            a.run()
            a.check(night(tmp_path))
        before = [f.name for f in o.data_files()]
        assert compact.compact(str(tmp_path)).files_rewritten
        assert set(f.name for f in o.data_files()) != set(before)
        assert [n for n, _ in doneindex.pointer_json(o)["covered"]] == [f.name for f in o.data_files()]
        a.check(night(tmp_path))
    assert "building the done set from the parts" not in caplog.text


def test_a_compaction_of_parts_the_index_has_not_merged_leaves_it_to_be_rebuilt(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    from pipeline import compact

    archive(tmp_path, ["a.jpg", "b.jpg"])
    night(tmp_path)
    archive(tmp_path, ["c.jpg"], "r2")  # committed, but no run saved the index after it
    compact.compact(str(tmp_path))
    assert "does not cover yet" in caplog.text
    done = night(tmp_path)
    assert "stale" in caplog.text
    assert done.check([ref("a.jpg"), ref("b.jpg"), ref("c.jpg"), ref("d.jpg")])[0].tolist() == \
        [True, True, True, False]


def test_another_identity_or_hash_width_is_not_used(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    archive(tmp_path, ["a.jpg"])
    night(tmp_path)
    o = store.open_output(str(tmp_path))
    assert doneindex.load(o, OTHER, o.data_files()) is None
    assert "another identity" in caplog.text
    assert night(tmp_path, OTHER).check([ref("a.jpg")])[0].tolist() == [False]
    assert doneindex.pointer_json(o)["identity"]["weights_sha256"] == "sha-B"  # one index: OTHER's
    monkeypatch.setattr(doneset, "HASH_BITS", 4)
    assert doneindex.load(o, OTHER, o.data_files()) is None
    assert "another hash width" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "pointer"])
def test_a_damaged_index_is_detected_and_rebuilt(tmp_path, damage, caplog):
    caplog.set_level(logging.INFO)
    archive(tmp_path, [f"a/{i}.jpg" for i in range(20)])
    night(tmp_path)
    o = store.open_output(str(tmp_path))
    pointer = doneindex.pointer_json(o)
    keys = o.uri(pointer["files"]["keys"]["name"])
    if damage == "truncate":
        with open(keys, "r+b") as f:
            f.truncate(os.path.getsize(keys) - 8)
    elif damage == "garbage":  # same length, other bytes: every key says "done" for a new id
        with open(keys, "r+b") as f:
            f.seek(os.path.getsize(keys) - 8)
            f.write(b"\xff" * 8)
    elif damage == "delete":
        os.unlink(keys)
    else:
        with open(o.uri(doneindex.POINTER), "wb") as f:
            f.write(b"{not json")
    assert doneindex.load(o, ME, o.data_files()) is None
    assert "not used" in caplog.text
    done = night(tmp_path)
    assert done.check([ref("a/3.jpg"), ref("a/30.jpg")])[0].tolist() == [True, False]
    assert doneindex.load(o, ME, o.data_files()) is not None  # the rebuilt one was saved


def test_superseded_entries_beyond_a_quarter_rebuild_the_index(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    archive(tmp_path, [f"a/{i}.jpg" for i in range(8)], "r1")
    night(tmp_path)
    archive(tmp_path, [f"a/{i}.jpg" for i in range(2)], "r2")  # 2 relabeled: 2 of 10 superseded
    night(tmp_path)
    assert "superseded" not in caplog.text
    archive(tmp_path, [f"a/{i}.jpg" for i in range(2, 4)], "r3")  # 4 of 12
    night(tmp_path)
    assert "more than a quarter of its entries are superseded" in caplog.text
    o = store.open_output(str(tmp_path))
    loaded = doneindex.load(o, ME, o.data_files())
    assert len(loaded.done._size) == len(loaded.done) == 8


KILLED_UPDATE = """
import os, sys, time
sys.path.insert(0, os.path.join(sys.argv[3], "tests"))
from pipeline import doneindex, store
from test_doneindex import ME, archive
out, step, phase = sys.argv[1], sys.argv[2], sys.argv[4]
o = store.open_output(out)
if phase == "end":  # the run's start found the index current; the run commits two parts
    done, basis = doneindex.done_set(o, ME)
    archive(out, ["c.jpg"], "r2")
    archive(out, ["a.jpg"], "r3")
def stop():
    print("stopped", flush=True)
    time.sleep(60)
real_write_file, real_write_json, real_delete = o.write_file, o.write_json, o.delete
arrays = []
def write_file(name, write, fenced=True):
    if step == "array" and len(arrays) == 3:
        stop()
    real_write_file(name, write, fenced)
    arrays.append(name)
def write_json(name, obj, fenced=True):
    if step == "pointer":
        stop()
    real_write_json(name, obj, fenced)
def delete(names, fenced=True):
    if step == "delete":
        stop()
    real_delete(names, fenced)
o.write_file, o.write_json, o.delete = write_file, write_json, delete
if phase == "start":  # a killed run left two parts: the next start merges them
    done, basis = doneindex.done_set(o, ME)
doneindex.refresh(o, ME, basis)
print("not stopped", flush=True)
"""


@pytest.mark.parametrize("phase", ["start", "end"])
@pytest.mark.parametrize("step", ["array", "pointer", "delete"])
def test_kill_9_at_each_step_of_an_update_leaves_a_usable_index(tmp_path, step, phase):
    """The update at a run's start (new parts found) or end (the run's parts), killed after 3 of
    the 6 arrays, after all 6 before the pointer, after the pointer before the old generation
    is deleted: the next run answers by the rule and saves a clean index."""
    archive(tmp_path, ["a.jpg", "b.jpg"])
    night(tmp_path)
    old = generation(tmp_path)
    if phase == "start":
        archive(tmp_path, ["c.jpg"], "r2")
        archive(tmp_path, ["a.jpg"], "r3")  # a relabel: its old entry is superseded
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, "-c", KILLED_UPDATE, str(tmp_path), step, ROOT,
                              phase], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "stopped"  # waits for the event
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    o = store.open_output(str(tmp_path))
    index = o.names(layout.INDEX)
    assert len(index) == {"array": 3 + 6 + 1, "pointer": 12 + 1, "delete": 12 + 1}[step]
    assert (generation(tmp_path) == old) == (step != "delete")
    loaded = doneindex.load(o, ME, o.data_files())
    assert loaded is not None and len(loaded.new) == (2 if step != "delete" else 0)
    probes = [ref("a.jpg"), ref("b.jpg"), ref("c.jpg"), ref("d.jpg")]
    assert night(tmp_path).check(probes)[0].tolist() == [True, True, True, False]
    assert night(tmp_path).check(probes)[0].tolist() == [True, True, True, False]
    assert len(o.names(layout.INDEX)) == 6 + 1  # the unreferenced files are gone
    assert doneindex.load(o, ME, o.data_files()).new == []


def test_merged_keys_stay_sorted_when_the_merge_narrows_the_new_files_hash(tmp_path, monkeypatch):
    """The new files' own done set keeps more hash bits than the merged index (fewer entries,
    fewer index bits): hashes that differ only in the bits the merge drops then tie, and must
    still come out sorted (a lookup binary-searches the keys). The hash is forced to differ only
    in bits 7-9 and the top bit, so the 57 bits of 100 new entries sort by them and the 53 bits
    of the 1,100 + 100 entries (as many index bits as the old index: its keys are streamed, not
    re-sorted) do not see them."""
    import zlib

    def narrow_hash(strings):
        crc = np.array([zlib.crc32(strings.bytes_of(i)) for i in range(len(strings))], np.uint64)
        return ((crc & np.uint64(1)) << np.uint64(63)) | (((crc >> np.uint64(1)) % np.uint64(8))
                                                         << np.uint64(7))

    monkeypatch.setattr(doneset, "_hash", narrow_hash)
    archive(tmp_path, [f"old/{i}.jpg" for i in range(1100)])
    night(tmp_path)
    archive(tmp_path, [f"new/{i}.jpg" for i in range(100)], run_id="r2")
    done = night(tmp_path)
    o = store.open_output(str(tmp_path))
    loaded, basis = doneindex.done_set(o, ME)
    assert basis.saved
    keys = np.asarray(loaded._keys)
    assert (keys[1:] > keys[:-1]).all()
    probes = [ref(f"old/{i}.jpg") for i in range(1100)] + [ref(f"new/{i}.jpg") for i in range(100)]
    assert done.check(probes)[0].all() and loaded.check(probes)[0].all()
    assert not loaded.check([ref("new/100.jpg"), ref("old/1100.jpg")])[0].any()
