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


def _clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    v = centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_past_ivf_from_the_index_turns_ivf_and_still_finds_what_it_holds() -> None:
    vectors = _clustered(600)
    index = FaissVectorIndex(32, device=None, ivf_from=400, nprobe=16)
    index.add([IndexEntry(f"u{i}", vectors[i], float(i)) for i in range(300)])
    assert not index.reindex_due() and not index.reindex() and index.kind == "Flat"
    index.add([IndexEntry(f"u{i}", vectors[i], float(i)) for i in range(300, 600)])
    assert index.reindex_due() and index.reindex()
    assert index.kind.startswith("IVF") and not index.reindex_due()  # due again only at twice the size
    found = [index.search(vectors[i][None], 1)[0][0].upload_id == f"u{i}" for i in range(0, 600, 7)]
    assert sum(found) / len(found) >= 0.95
    assert index.evict_older_than(100.0) == 100  # IVF removes ids too
    assert all(h.upload_id != "u5" for h in index.search(vectors[5][None], 10)[0])


def test_changes_made_while_ivf_trains_are_replayed_into_it() -> None:
    vectors = _clustered(520, seed=1)
    index = FaissVectorIndex(32, device=None, ivf_from=400)
    index.add([IndexEntry(f"u{i}", vectors[i], float(i)) for i in range(500)])
    build = index._build_ivf

    def build_while_the_stream_goes_on(ids: np.ndarray, vecs: np.ndarray) -> faiss.Index:
        built = build(ids, vecs)
        index.add([IndexEntry(f"late{i}", vectors[i], 1e6) for i in range(500, 520)])  # arrives meanwhile
        index.evict_older_than(50.0)  # and the oldest 50 leave the window
        return built

    index._build_ivf = build_while_the_stream_goes_on  # type: ignore[method-assign]
    assert index.reindex() and index.kind.startswith("IVF")
    assert len(index) == 470
    assert index.search(vectors[510][None], 1)[0][0].upload_id == "late510"
    hits = {h.upload_id for h in index.search(vectors[3][None], 20)[0]}
    assert "u3" not in hits
