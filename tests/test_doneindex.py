"""The persisted done index: saved beside the parts, memory-mapped on load, and never used when
it is stale (the data files changed), damaged (truncated or garbage files) or of another
identity or hash width; a kill -9 while it is saved leaves the previous index usable."""
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from pipeline import doneindex, doneset, store
from pipeline.doneset import Identity
from pipeline.store import layout

from test_doneset import ME, commit, ok_rows, ref, stamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def archive(out, names, run_id="r1"):
    commit(out, run_id, ok_rows([ref(n) for n in names], stamp(run_id)), ME.metadata())


def built_and_saved(out, identity=ME):
    o = store.open_output(str(out))
    files = o.data_files()
    done = doneset.done_set(o, identity)
    doneindex.save(o, done, identity, files)
    return o, files


def test_a_saved_index_is_memory_mapped_and_answers_like_the_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(doneset, "HASH_BITS", 2)  # every lookup meets collisions
    archive(tmp_path, [f"a/{i}.jpg" for i in range(50)])
    o, files = built_and_saved(tmp_path)
    loaded = doneindex.load(o, ME, files)
    assert loaded is not None
    assert isinstance(loaded._keys, np.memmap)
    probes = [ref(f"a/{i}.jpg") for i in range(60)] + [ref("a/1.jpg", size=7)]
    is_done, _ = loaded.check(probes)
    assert is_done.tolist() == [True] * 50 + [False] * 11


def test_a_stale_index_is_not_used(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    archive(tmp_path, ["a.jpg", "b.jpg"])
    o, files = built_and_saved(tmp_path)
    archive(tmp_path, ["c.jpg"], "r2")  # a part added
    assert doneindex.load(o, ME, o.data_files()) is None
    assert "stale" in caplog.text
    os.unlink(o.uri(files[0].name))  # a covered part deleted
    assert doneindex.load(o, ME, o.data_files()) is None


def test_another_identity_or_hash_width_is_not_used(tmp_path, monkeypatch):
    archive(tmp_path, ["a.jpg"])
    o, files = built_and_saved(tmp_path)
    assert doneindex.load(o, Identity("m", "sha-B", "pre", "litert", "float32"), files) is None
    monkeypatch.setattr(doneset, "HASH_BITS", 4)
    assert doneindex.load(o, ME, files) is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "pointer"])
def test_a_damaged_index_is_detected(tmp_path, damage, caplog):
    caplog.set_level(logging.INFO)
    archive(tmp_path, [f"a/{i}.jpg" for i in range(20)])
    o, files = built_and_saved(tmp_path)
    pointer = doneindex.pointer_json(o)
    keys = o.uri(pointer["files"]["keys"]["name"])
    if damage == "truncate":
        with open(keys, "r+b") as f:
            f.truncate(os.path.getsize(keys) - 8)
    elif damage == "garbage":  # same length, other bytes
        with open(keys, "r+b") as f:
            f.seek(os.path.getsize(keys) - 8)
            f.write(b"\xff" * 8)
    elif damage == "delete":
        os.unlink(keys)
    else:
        with open(o.uri(doneindex.POINTER), "wb") as f:
            f.write(b"{not json")
    assert doneindex.load(o, ME, files) is None
    assert "not used" in caplog.text


KILLED_SAVE = """
import os, sys, time
from pipeline import doneindex, doneset, store
from pipeline.doneset import Identity
o = store.open_output(sys.argv[1])
identity = Identity("m", "sha-A", "pre", "litert", "float32")
files = o.data_files()
done = doneset.done_set(o, identity)
real = o.write_json
def stopped(name, obj, fenced=True):
    print("arrays written", flush=True)
    time.sleep(60)
o.write_json = stopped
doneindex.save(o, done, identity, files)
"""


def test_kill_9_while_saving_leaves_the_previous_index(tmp_path):
    archive(tmp_path, ["a.jpg", "b.jpg"])
    o, files = built_and_saved(tmp_path)
    archive(tmp_path, ["c.jpg"], "r2")
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], env=env,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "arrays written"  # waits for the event
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert len(o.names(layout.INDEX)) > len(doneindex.ARRAYS) + 1  # the new arrays were there
    old = doneindex.load(o, ME, files)  # the previous index is whole (lengths, crc32)
    assert old is not None and old.check([ref("a.jpg"), ref("c.jpg")])[0].tolist() == [True, False]
    assert doneindex.load(o, ME, o.data_files()) is None  # and stale for the new part
    pointer = doneindex.pointer_json(o)
    assert [tuple(c) for c in pointer["covered"]] == [(f.name, f.size) for f in files]
    for entry in pointer["files"].values():
        assert os.path.getsize(o.uri(entry["name"])) == entry["bytes"]
    o2, files2 = built_and_saved(tmp_path)  # the next save deletes the unreferenced files
    assert len(o2.names(layout.INDEX)) == len(doneindex.ARRAYS) + 1
    assert doneindex.load(o2, ME, files2).check([ref("c.jpg")])[0].tolist() == [True]
