"""The output store's interface, the same on a local directory and on S3 (moto_server)."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import store
from pipeline.store import layout
from pipeline.store.replace import Replacement, recover, replacements
from pipeline.types import S3Options


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return store.open_output(str(tmp_path / "out"))
    s3 = request.getfixturevalue("s3")
    return store.open_output(f"s3://{s3.bucket}/labels/", S3Options(endpoint=s3.server.endpoint))


def parquet(n: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": list(range(n))}), sink)
    return sink.getvalue().to_pybytes()


def test_files_are_listed_in_name_order_with_sizes_and_read_as_one_dataset(out):
    out.prepare()
    for name, n in [("part-b-00001.parquet", 3), ("part-a-00000.parquet", 2), ("notes.txt", 0)]:
        out.write_bytes(name, parquet(n) if n else b"x")
    out.write_json(layout.run_manifest("a"), {"run_id": "a"})
    files = out.data_files()
    assert [f.name for f in files] == ["part-a-00000.parquet", "part-b-00001.parquet"]
    assert [f.size for f in files] == [len(parquet(2)), len(parquet(3))]
    assert out.names(layout.RUNS) == ["a.json"] and out.read_json(layout.run_manifest("a")) == {
        "run_id": "a"}
    table = out.dataset([f.name for f in files]).to_table()
    assert table.column("x").to_pylist() == [0, 1, 0, 1, 2]
    assert out.read_bytes("notes.txt", 0) == b"" and out.read_bytes("notes.txt", 10) == b"x"
    with pytest.raises(FileNotFoundError):
        out.read_bytes("missing")


def test_a_large_file_is_uploaded_in_pieces_and_a_failed_write_leaves_nothing(out, monkeypatch):
    from pipeline.store import s3 as s3_store

    monkeypatch.setattr(s3_store, "MULTIPART_PIECE", 5 << 20)  # S3's smallest piece
    out.prepare()
    data = bytes(range(256)) * (48 << 10)  # 12 MiB: three pieces on S3
    out.write_bytes("big.bin", data)
    with out.writing(layout.index_file("ids.bin")) as path:
        with open(path, "wb") as f:
            f.write(data[:7 << 20])
    assert out.read_bytes("big.bin") == data
    assert out.read_bytes(layout.index_file("ids.bin")) == data[:7 << 20]
    with pytest.raises(RuntimeError):
        with out.writing("half.bin") as path:
            open(path, "wb").write(b"half")
            raise RuntimeError("killed")
    assert "half.bin" not in out.names() and not [n for n in out.names() if n.startswith("_tmp")]


def test_conditional_create_and_replace(out):
    out.prepare()
    token = out.create_bytes("_gen", b"1")
    assert token and out.create_bytes("_gen", b"2") is None
    newer = out.replace_bytes("_gen", b"3", token)
    assert newer and out.replace_bytes("_gen", b"4", token) is None
    data, current, _ = out.read_versioned("_gen")
    assert (data, current) == (b"3", newer)
    out.delete(["_gen"])
    assert out.replace_bytes("_gen", b"5", newer) is None and out.read_versioned("_gen") is None


def test_a_replacement_publishes_staged_files_as_a_unit(out):
    out.prepare()
    out.write_bytes("part-r1-00000.parquet", parquet(2))
    rep = Replacement(out, "compact", "c1", None, ["part-r1-00000.parquet"], ["part-c1-00000.parquet"])
    rep.save()
    out.write_bytes(layout.staged_name("part-c1-00000.parquet"), parquet(1))
    assert [f.name for f in out.data_files()] == ["part-r1-00000.parquet"]  # staged: hidden
    rep.state = "commit"
    rep.save()  # killed right after marking it committed: the next start finishes the swap
    assert recover(out) == ["finished the interrupted compact c1"]
    assert [f.name for f in out.data_files()] == ["part-c1-00000.parquet"]
    assert out.names() == ["part-c1-00000.parquet"] and replacements(out) == []
