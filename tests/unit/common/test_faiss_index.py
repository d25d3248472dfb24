import faiss
import numpy as np

from services.common.index import FaissVectorIndex, IndexEntry
from services.common.index.faiss_index import gpu_device_copy


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


def test_search_copy_follows_additions_and_is_rebuilt_after_eviction() -> None:
    """The device-copy bookkeeping, with faiss.clone_index standing in for faiss.index_cpu_to_gpu."""
    copies: list[int] = []

    def device(index: faiss.Index) -> faiss.Index:
        copies.append(index.ntotal)
        return faiss.clone_index(index)

    index = FaissVectorIndex(16, device=device)
    plain = FaissVectorIndex(16, device=None)
    assert index.on_device and not plain.on_device
    first = [IndexEntry(f"u{i}", _vec(i), float(i)) for i in range(10)]
    index.add(first)
    plain.add(first)
    assert index.search(_vec(2)[None], 1)[0][0].upload_id == "u2"
    assert copies == [10]  # copied once, at the first search
    index.add([IndexEntry("late", _vec(99), 50.0)])  # goes to the copy as well: no new copy
    assert index.search(_vec(99)[None], 1)[0][0].upload_id == "late" and copies == [10]
    assert index.evict_older_than(5.0) == 5  # a GPU flat index cannot remove ids: the copy is dropped ...
    hits = index.search(_vec(7)[None], 20)[0]
    assert copies == [10, 6]  # ... and rebuilt from the CPU index at the next search
    assert {h.upload_id for h in hits} == {f"u{i}" for i in range(5, 10)} | {"late"}
    plain.add([IndexEntry("late", _vec(99), 50.0)])
    plain.evict_older_than(5.0)
    expected = plain.search(_vec(7)[None], 20)[0]
    assert [(h.upload_id, round(h.score, 5)) for h in hits] == [(h.upload_id, round(h.score, 5)) for h in expected]


def test_without_faiss_gpu_the_index_stays_on_the_cpu() -> None:
    # This project installs faiss-cpu: no GPU resources, so "auto" must not pick a device.
    assert not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0
    assert gpu_device_copy() is None and not FaissVectorIndex(16).on_device
