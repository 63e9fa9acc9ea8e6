"""The done set's key search agrees with np.searchsorted: random and repeated keys, keys at both
ends of the range, queries outside it, a directory of zero bits and one with many buckets."""
import numpy as np
import pytest

from pipeline import sortedkeys
from pipeline.sortedkeys import SortedKeys


@pytest.mark.parametrize("n, used_bits", [(0, 8), (1, 64), (5, 64), (7, 3), (1000, 64),
                                          (1000, 12), (50_000, 40), (200_000, 64)])
def test_first_at_least_is_searchsorted_left(n, used_bits, monkeypatch):
    monkeypatch.setattr(sortedkeys, "SLICE", 777)  # the directory counted in many slices
    rng = np.random.default_rng(n + used_bits)
    top = np.uint64((1 << used_bits) - 1) if used_bits < 64 else np.uint64(2**64 - 1)
    keys = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) & top
    if n > 10:
        keys[:3] = 0
        keys[-3:] = top
        keys[n // 2:n // 2 + 20] = keys[n // 2]  # a run of equal keys
    keys = np.sort(keys)
    queries = np.concatenate([
        rng.integers(0, 2**63, 3000, dtype=np.uint64) * np.uint64(2) & top,
        keys[rng.integers(0, max(n, 1), 3000)] if n else np.zeros(0, np.uint64),
        np.array([0, 1, top, top - np.uint64(1)], np.uint64)])
    want = np.searchsorted(keys, queries, "left")
    got = SortedKeys(keys, used_bits).first_at_least(queries) if n else np.zeros(len(queries))
    assert np.array_equal(got, want)
