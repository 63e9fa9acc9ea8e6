"""flatstrings' vectorized hash and comparison against plain-Python statements of them. The
done index stores keys made of hash64, so its values must never change: the model below is
the definition (splitmix64's finalizer over the length, then over each little-endian 8-byte
word, the last one zero-padded)."""
import random

import numpy as np
import pyarrow as pa
import pytest

from pipeline.flatstrings import FlatStrings, equal, hash64

M = (1 << 64) - 1
M1, M2, M3 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def mix(x: int) -> int:
    x ^= x >> 30
    x = (x * M2) & M
    x ^= x >> 27
    x = (x * M3) & M
    return x ^ (x >> 31)


def python_hash64(data: bytes) -> int:
    h = mix((len(data) * M1 + M1) & M)
    for w in range(0, len(data), 8):
        word = int.from_bytes(data[w:w + 8].ljust(8, b"\0"), "little")
        h = mix(((h + word) * M1) & M)
    return h


def tricky_batches():
    """Batches that take each of hash64's paths: one length (whole words, then a masked one),
    mixed lengths where most strings go on, one long string among short ones (a subset goes
    on), empty strings, NUL bytes, non-ASCII, and a slice of an array (an offset)."""
    rng = random.Random(11)
    alphabet = "ab/_.9\x00éß漢😀"

    def text(k):
        return "".join(rng.choice(alphabet) for _ in range(k))

    yield [text(27) for _ in range(50)]
    yield [text(rng.choice([0, 1, 7, 8, 9, 16, 17, 24, 31])) for _ in range(300)]
    yield [text(rng.randrange(0, 12)) for _ in range(100)] + [text(400)]
    yield ["", "", "a", "a\x00", "\x00", "é", "e"]
    yield [text(rng.randrange(20, 40)) for _ in range(200)]


@pytest.mark.parametrize("batch", list(tricky_batches()), ids=lambda b: f"{len(b)}-strings")
def test_hash64_is_the_documented_function(batch):
    arr = pa.array(batch, pa.string())
    for a in (arr, arr.slice(3)):
        want = [python_hash64(s.encode()) for s in a.to_pylist()]
        assert hash64(FlatStrings.of_arrow(a)).tolist() == want


@pytest.mark.parametrize("batch", list(tricky_batches()), ids=lambda b: f"{len(b)}-strings")
def test_equal_is_byte_equality_even_at_the_buffers_end(batch):
    """Pairs of equal strings, of strings differing in one byte or in length, and pairs whose
    string is the last of its buffer (a word read past it must not count)."""
    rng = random.Random(5)
    other = [s if rng.random() < 0.6 else (s[:-1] if s and rng.random() < 0.5 else s + "x")
             for s in batch]
    a, b = FlatStrings.of_arrow(pa.array(batch)), FlatStrings.of_arrow(pa.array(other))
    n = len(batch)
    ai = np.array([rng.randrange(n) for _ in range(400)] + [n - 1, n - 1, 0])
    bi = ai.copy()
    bi[200:400] = [rng.randrange(n) for _ in range(200)]
    bi[-1] = n - 1
    want = [batch[i].encode() == other[j].encode() for i, j in zip(ai, bi)]
    assert equal(a, ai, b, bi).tolist() == want
    assert equal(b, bi, a, ai).tolist() == want
