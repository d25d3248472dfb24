"""The index-backends benchmark's vectors and helpers (no servers)."""

from __future__ import annotations

import numpy as np

from bench.common import Progress
from bench.index_backends import PhotoMixture, exact_top1, fill, row_of, upload_id
from services.common.index.base import IndexEntry, Neighbour


def _photos(n: int = 40, dim: int = 32) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mixture_is_deterministic_unit_and_nested() -> None:
    mixture = PhotoMixture(_photos())
    mixture.BLOCK = 500
    small, big = mixture.window(500), mixture.window(1200)
    assert np.allclose(np.linalg.norm(big, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(small, big[:500])  # the smaller window is the start of the larger one
    again = PhotoMixture(_photos())
    again.BLOCK = 500
    assert np.array_equal(big, again.window(1200))


def test_near_duplicate_queries_find_their_planted_original() -> None:
    mixture = PhotoMixture(_photos(), seed=3)
    window = mixture.window(2000)
    queries, planted = mixture.queries(window, 100)
    dup = planted >= 0
    assert dup.sum() == 80 and (~dup).sum() == 20
    cos = np.sum(queries[dup] * window[planted[dup]], axis=1)
    assert 0.9 < float(np.median(cos)) < 0.99
    truth = exact_top1(window, queries)
    assert np.array_equal(truth, np.argmax(queries @ window.T, axis=1))
    assert np.mean(truth[dup] == planted[dup]) > 0.8


def test_fill_adds_every_row_once_with_own_arrays() -> None:
    window = np.eye(10, 4, dtype=np.float32)
    got: list[IndexEntry] = []
    stats = fill(got.extend, window, 2, 10, 3, Progress("test", enabled=False))
    assert [e.upload_id for e in got] == [upload_id(r) for r in range(2, 10)]
    assert all(e.vector.base is None for e in got)
    assert stats["rows"] == 8 and stats["call_ms"]["n"] == 3
    assert row_of(Neighbour(upload_id(1234567), 0.5)) == 1234567
