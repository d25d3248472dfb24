import numpy as np

from services.common.index import FaissVectorIndex, IndexEntry


def _vec(seed: int, dim: int = 16) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_nearest_is_itself_and_readd_is_idempotent() -> None:
    index = FaissVectorIndex(16)
    assert index.add([IndexEntry(f"u{i}", _vec(i), 100.0 + i) for i in range(10)]) == 10
    assert index.add([IndexEntry("u3", _vec(3), 200.0)]) == 0
    assert len(index) == 10
    hits = index.search(_vec(3)[None], 3)[0]
    assert hits[0].upload_id == "u3" and abs(hits[0].score - 1.0) < 1e-5
    assert hits[1].score < hits[0].score


def test_eviction_by_age() -> None:
    index = FaissVectorIndex(16)
    index.add([IndexEntry(f"u{i}", _vec(i), float(i)) for i in range(10)])
    assert index.evict_older_than(5.0) == 5
    assert len(index) == 5
    ids = {n.upload_id for n in index.search(_vec(1)[None], 10)[0]}
    assert ids == {f"u{i}" for i in range(5, 10)}


def test_empty_index_returns_no_neighbours() -> None:
    assert FaissVectorIndex(16).search(_vec(0)[None], 5) == [[]]
