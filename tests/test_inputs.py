"""pipeline.inputs: one input, local or S3, stat'ed and read through one interface (real files,
a real FIFO, moto_server for S3)."""
import os

import pytest

from pipeline import inputs
from pipeline.imageinfo import ImageError
from pipeline.types import S3Options


def s3_options(s3) -> S3Options:
    return S3Options(endpoint=s3.server.endpoint, region="us-east-1", max_attempts=2)


def test_local_regular_file_is_stat_and_read_whole_or_up_to_a_limit(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"0123456789")
    os.utime(path, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    src = inputs.open_input(str(path))
    assert src.stat() == (str(path), 10, 1_600_000_000_123_456_789)
    assert src.read() == b"0123456789"
    assert src.read(4) == b"0123"
    assert not inputs.is_remote(str(path))


def test_local_missing_file_is_not_found(tmp_path):
    src = inputs.open_input(str(tmp_path / "gone.jpg"))
    assert src.stat() == (str(tmp_path / "gone.jpg"), None, None)
    with pytest.raises(ImageError) as e:
        src.read()
    assert e.value.kind == "not_found"


def test_a_fifo_is_neither_sized_nor_read(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    src = inputs.open_input(str(fifo))
    assert src.stat().size is None  # the reader will not open it
    with pytest.raises(ImageError, match="a FIFO") as e:
        src.read(100)  # returns at once: opened without blocking, refused by its descriptor
    assert e.value.kind == "unreadable"
    with pytest.raises(ImageError, match="a FIFO"):
        src.read_explained(100)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ImageError, match="a directory"):
        inputs.open_input(str(tmp_path)).read()


def test_resolve_makes_a_local_path_absolute_and_keeps_a_uri(tmp_path):
    (tmp_path / "x").mkdir()
    assert inputs.resolve("x/../a.jpg", str(tmp_path)) == str(tmp_path / "a.jpg")
    assert inputs.resolve("s3://b/a//c.jpg", str(tmp_path)) == "s3://b/a//c.jpg"


def test_s3_objects_incl_an_empty_segment_key_are_stat_and_read(s3):
    opts = s3_options(s3)
    s3.client.put_object(Bucket=s3.bucket, Key="in/a.jpg", Body=b"abcdef")
    s3.client.put_object(Bucket=s3.bucket, Key="in//b.jpg", Body=b"0123456789")
    head = {k: s3.client.head_object(Bucket=s3.bucket, Key=k) for k in ("in/a.jpg", "in//b.jpg")}
    plain, raw = f"s3://{s3.bucket}/in/a.jpg", f"s3://{s3.bucket}/in//b.jpg"
    missing = f"s3://{s3.bucket}/in/none.jpg"
    assert inputs.is_remote(plain)

    stats = inputs.stat_many([plain, raw, missing], opts)
    assert [s.uri for s in stats] == [plain, raw, missing]
    assert [s.size for s in stats] == [6, 10, None]
    assert stats[0].mtime_ns // 10**9 == int(head["in/a.jpg"]["LastModified"].timestamp())
    assert stats[1].mtime_ns // 10**9 == int(head["in//b.jpg"]["LastModified"].timestamp())
    assert stats[2].mtime_ns is None

    assert inputs.open_input(plain, opts).read() == b"abcdef"
    assert inputs.open_input(plain, opts).read(2) == b"ab"
    assert inputs.open_input(raw, opts).read() == b"0123456789"
    assert inputs.open_input(raw, opts).read(3) == b"012"  # a ranged GET by raw key
    for uri in (missing, f"s3://{s3.bucket}/in//none.jpg"):
        with pytest.raises(ImageError) as e:
            inputs.open_input(uri, opts).read()
        assert e.value.kind == "not_found"


def test_stat_many_keeps_the_order_of_mixed_local_and_s3_inputs(s3, tmp_path):
    opts = s3_options(s3)
    s3.client.put_object(Bucket=s3.bucket, Key="x.jpg", Body=b"12345")
    local = tmp_path / "y.jpg"
    local.write_bytes(b"123")
    uris = [str(local), f"s3://{s3.bucket}/x.jpg", str(tmp_path / "z.jpg")]
    assert [s.size for s in inputs.stat_many(uris, opts)] == [3, 5, None]


def test_s3_read_explained_uses_the_listed_size_and_stops_on_an_outage(s3):
    opts = s3_options(s3)
    uri = f"s3://{s3.bucket}/big.jpg"
    with pytest.raises(ImageError) as e:
        inputs.open_input(uri, opts).read_explained(100, listed_size=0)
    assert e.value.kind == "empty_file"
    with pytest.raises(ImageError) as e:
        inputs.open_input(uri, opts).read_explained(100, listed_size=101)
    assert e.value.kind == "too_large"
    down = S3Options(endpoint="http://127.0.0.1:9", region="us-east-1", max_attempts=1,
                     connect_timeout=1, request_timeout=1)
    with pytest.raises(inputs.storage.S3Unavailable):
        inputs.open_input(f"s3://{s3.bucket}/in//b.jpg", down).read_explained(100, 10)
