"""The bounded done set against a plain-Python statement of the rule, on parts written by the
real writer; with the hash narrowed to a few bits so that collisions are everywhere."""
import datetime as dt
import random

import numpy as np
import pyarrow as pa
import pytest

from pipeline import doneset, store
from pipeline.doneset import Identity
from pipeline.types import ErrorRecord, ImageRef, Labels
from pipeline.writer import PartWriter, RunStamp, error_table, prediction_table

T0 = 1_700_000_000_000_000_000
PERMANENT = {"empty_file", "corrupt", "unsupported_format", "too_large"}
TRANSIENT = ["not_found", "unreadable"]
ME = Identity("m", "sha-A", "pre", "litert", "float32")


def ref(name, size=100, mtime_ns=T0):
    return ImageRef(name, f"/x/{name}", size, mtime_ns)


def stamp(run_id, model="m"):
    return RunStamp(model, run_id)


def ok_rows(refs, st):
    n = len(refs)
    return prediction_table(refs, np.ones(n), np.ones(n), np.zeros((n, 1), int),
                            np.ones((n, 1), np.float32), st, Labels(("a",), ("alpha",)))


def done_set(out, identity, **kw):
    return doneset.done_set(store.open_output(str(out)), identity, **kw)


def commit(out, run_id, table, metadata):
    w = PartWriter(store.open_output(str(out)), run_id, part_size=7, metadata=metadata)  # several parts per run
    w.add(table)
    w.commit()


def at(table, when):
    """Every row of `table` stamped labeled_at = `when` (to force ties and reordering)."""
    i = table.schema.get_field_index("labeled_at")
    return table.set_column(i, "labeled_at", pa.array([when] * table.num_rows,
                                                      pa.timestamp("us", tz="UTC")))


def expected(rows, identity, refs):
    """The documented rule, stated directly: the latest row per image_id (newest labeled_at,
    ties: later row) is done when it is ok or a permanent error, of these scores, same size and
    mtime; a latest transient error with the same size/mtime (or a missing file) is reported."""
    latest = {}
    for order, r in enumerate(rows):
        key = (r["labeled_at"], order)
        if r["image_id"] not in latest or key >= latest[r["image_id"]][0]:
            latest[r["image_id"]] = (key, r)
    done, previous = [], []
    for x in refs:
        r = latest.get(x.image_id, (None, None))[1]
        mtime = None if x.mtime_ns is None else x.mtime_ns // 1000
        same = r is not None and (r["file_size"], r["mtime"]) == (x.file_size, mtime)
        good = r is not None and (r["status"] == "ok" or r["error_kind"] in PERMANENT)
        done.append(same and good and r["scores"] == identity)
        transient = r is not None and not good
        previous.append(r["error_kind"] if transient and (same or x.file_size is None) else None)
    return done, previous


def random_archive(out, rng, n_ids, runs):
    """Runs of two identities labeling overlapping ids: ok rows, transient and permanent errors,
    changed files, equal labeled_at across runs. Returns every row in dataset order."""
    names = [f"dir{rng.randrange(3)}/img{i:05d}.jpg" for i in range(n_ids)]
    other = Identity("m", "sha-B", "pre", "litert", "float32")
    written = []
    for run in range(runs):
        identity = other if run % 3 == 1 else ME
        st = stamp(f"r{run:03d}")
        chosen = rng.sample(names, rng.randrange(1, n_ids))
        refs = [ref(n, size=rng.choice([100] * 5 + [101]), mtime_ns=T0 + rng.choice([0] * 5 + [1000]))
                for n in chosen]
        kinds = [rng.choice(["ok", "ok", "ok"] + TRANSIENT + sorted(PERMANENT)) for _ in refs]
        oks = [r for r, k in zip(refs, kinds) if k == "ok"]
        errs = [ErrorRecord(r, k, "msg") for r, k in zip(refs, kinds) if k != "ok"]
        when = dt.datetime(2025, 1, 1 + run // 2, tzinfo=dt.timezone.utc)  # pairs of runs tie
        table = pa.concat_tables([at(ok_rows(oks, st), when), at(error_table(errs, st), when)])
        commit(out, st.run_id, table, identity.metadata())
        for row in table.to_pylist():
            written.append({**row, "mtime": int(row["mtime"].timestamp() * 1e6),
                            "labeled_at": row["labeled_at"], "scores": identity})
    return names, written


@pytest.mark.parametrize("bits, slice_rows", [(64, 1 << 20), (4, 1 << 20), (1, 1 << 20), (4, 3)])
def test_the_done_set_agrees_with_the_rule_even_when_every_hash_collides(tmp_path, monkeypatch,
                                                                          bits, slice_rows):
    monkeypatch.setattr(doneset, "HASH_BITS", bits)
    monkeypatch.setattr(doneset, "SLICE_ROWS", slice_rows)  # arrays transformed in slices
    rng = random.Random(bits)
    names, rows = random_archive(tmp_path, rng, 60, 12)
    assert len(rows) > 200
    # run names sort in time order, so dataset order is the written order
    listing = [ref(n, size=rng.choice([100] * 6 + [101, None]),
                   mtime_ns=T0 + rng.choice([0] * 6 + [1000])) for n in names]
    listing += [ref(f"dir0/new{i}.jpg") for i in range(40)]  # never labeled
    listing += [ref(n + "x") for n in names[:10]] + [ref(n[:-1]) for n in names[:10]]
    done = done_set(tmp_path, ME)
    is_done, previous = done.check(listing)
    want_done, want_previous = expected(rows, ME, listing)
    assert is_done.tolist() == want_done
    assert previous == want_previous
    assert 10 < sum(want_done) < len(names)  # the archive exercises both outcomes
    assert any(want_previous)


def test_new_images_are_never_done_with_a_4_bit_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(doneset, "HASH_BITS", 4)  # 16 hash values for 2000 images
    labeled = [ref(f"a/{i}.jpg") for i in range(2000)]
    meta = ME.metadata()
    commit(tmp_path, "r1", ok_rows(labeled, stamp("r1")), meta)
    done = done_set(tmp_path, ME)
    new = [ref(f"a/{i}.jpg") for i in range(2000, 4000)] + [ref(f"b/{i}.jpg") for i in range(2000)]
    is_done, previous = done.check(labeled + new)
    assert is_done[:2000].all()
    assert not is_done[2000:].any()
    assert previous == [None] * len(previous)


def test_hash_collisions_really_happen_at_4_bits(tmp_path, monkeypatch):
    """The test above must be able to fail: at 4 bits, different ids share a hash."""
    monkeypatch.setattr(doneset, "HASH_BITS", 4)
    ids = doneset._Strings.of([f"a/{i}.jpg" for i in range(100)])
    assert len(np.unique(doneset._reduced_hash(ids, 4))) <= 16
    assert len(np.unique(doneset._hash(ids))) == 100


def test_other_scores_are_not_done_and_parts_without_them_recorded_count(tmp_path):
    img = [ref(f"i{i}.jpg") for i in range(4)]
    commit(tmp_path, "r1", ok_rows(img[:1], stamp("r1")), {"pipeline.model": "m"})  # before 2026
    commit(tmp_path, "r2", ok_rows(img[1:2], stamp("r2")),
           {"pipeline.model": "m", "pipeline.weights_sha256": "sha-A"})  # no runtime recorded
    commit(tmp_path, "r3", ok_rows(img[2:3], stamp("r3")),
           {"pipeline.model": "m", "pipeline.weights_sha256": "sha-B"})
    commit(tmp_path, "r4", ok_rows(img[3:], stamp("r4")), {**ME.metadata(), "pipeline.runtime": "keras"})
    is_done, _ = done_set(tmp_path, ME).check(img)
    assert is_done.tolist() == [True, True, False, False]


def test_a_relabel_with_other_weights_supersedes_the_old_row(tmp_path):
    img = [ref("a.jpg")]
    commit(tmp_path, "r1", ok_rows(img, stamp("r1")), ME.metadata())
    assert done_set(tmp_path, ME).check(img)[0].tolist() == [True]
    other = Identity("m", "sha-B", "pre", "litert", "float32")
    commit(tmp_path, "r2", ok_rows(img, stamp("r2")), other.metadata())
    assert done_set(tmp_path, ME).check(img)[0].tolist() == [False]
    assert done_set(tmp_path, other).check(img)[0].tolist() == [True]


def test_other_models_ignored_parts_and_an_empty_output(tmp_path):
    assert len(done_set(tmp_path, ME)) == 0
    assert done_set(tmp_path, ME).check([ref("a")])[0].tolist() == [False]
    commit(tmp_path, "r1", ok_rows([ref("a")], stamp("r1", "n")), {"pipeline.model": "n"})
    commit(tmp_path, "r2", ok_rows([ref("b")], stamp("r2")), {})  # no metadata: by the column
    commit(tmp_path, "r3", ok_rows([ref("c")], stamp("r3", "n")), {})
    commit(tmp_path, "r4", ok_rows([ref("d")], stamp("r4")), ME.metadata())
    refs = [ref(x) for x in "abcd"]
    assert done_set(tmp_path, ME).check(refs)[0].tolist() == [False, True, False, True]
    ignored = frozenset(p.name for p in tmp_path.glob("part-r4-*.parquet"))
    assert done_set(tmp_path, ME, ignore=ignored).check(refs)[0].tolist() == \
        [False, True, False, False]


def test_a_corrupt_part_is_an_output_error_naming_it(tmp_path):
    from pipeline.store import OutputError

    commit(tmp_path, "r1", ok_rows([ref("a")], stamp("r1")), ME.metadata())
    (tmp_path / "part-zzz-00000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(OutputError, match="part-zzz-00000.parquet"):
        done_set(tmp_path, ME)


def test_non_ascii_and_long_ids_hash_and_compare_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(doneset, "HASH_BITS", 2)
    names = ["é/ü.jpg", "e/u.jpg", "x" * 200 + ".jpg", "x" * 199 + "y.jpg", "日本/写真.png",
             "a" * 8, "a" * 16, "a" * 9]
    commit(tmp_path, "r1", ok_rows([ref(n) for n in names[::2]], stamp("r1")), ME.metadata())
    is_done, _ = done_set(tmp_path, ME).check([ref(n) for n in names])
    assert is_done.tolist() == [True, False] * 4


def test_sizes_beyond_4_gib_and_unknown_sizes_after_small_ones(tmp_path):
    """Sizes are kept as uint32 until one does not fit: a 5 GiB file in a later part (and a
    size exactly at the uint32 limit) must still compare exactly, as must a null size."""
    meta = ME.metadata()
    small = [ref(f"s{i}.jpg", size=1000 + i) for i in range(20)]
    commit(tmp_path, "r1", ok_rows(small, stamp("r1")), meta)
    big = [ref("big.jpg", size=5 * 2**30), ref("edge.jpg", size=2**32 - 1),
           ref("none.jpg", size=None)]
    commit(tmp_path, "r2", ok_rows(big, stamp("r2")), meta)
    done = done_set(tmp_path, ME)
    probes = small[:2] + big + [ref("big.jpg", size=2**30), ref("edge.jpg", size=2**32 - 2),
                                ref("none.jpg", size=2**32 - 1), ref("s0.jpg", size=2**32 + 1000)]
    assert done.check(probes)[0].tolist() == [True, True, True, True, True,
                                              False, False, False, False]
