"""Inner-product FAISS index with string ids: exact while small, IVF past ``ivf_from``; GPU copy when available.

The CPU index stays the source of truth: GPU flat indexes cannot remove ids, so additions go to both and an
eviction drops the GPU copy, which the next search rebuilds. With faiss-cpu (this project's default wheel) or
no visible GPU, everything runs on the CPU. The GPU branch has not run here: no GPU was available.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Literal

import faiss
import numpy as np
from numpy.typing import NDArray

from services.common.index.base import IndexEntry, Neighbour

# One query at a time per batch item: OpenMP threads cost far more than they give on a shared 2-core machine
# (measured 27x slower single-vector searches with FAISS's default of 2 threads, bench/results/peers.json).
faiss.omp_set_num_threads(1)


# Copies an index to the device searches run on.
DeviceCopy = Callable[[faiss.Index], faiss.Index]


def gpu_device_copy() -> DeviceCopy | None:
    """faiss-gpu's copy to GPU 0 when this faiss build has GPU support and sees a GPU; None otherwise."""
    if not hasattr(faiss, "StandardGpuResources"):
        return None
    try:
        if faiss.get_num_gpus() < 1:
            return None
        resources = faiss.StandardGpuResources()
    except RuntimeError:
        return None
    return lambda index: faiss.index_cpu_to_gpu(resources, 0, index)


class FaissVectorIndex:
    """Exact (Flat) until ``ivf_from`` entries, then IVF-Flat, retrained in the background as the window doubles.

    At 1M x 256-d an exact search costs ~70 ms a query on one core; IVF4096 with nprobe 16 answers in ~1 ms at
    recall@1 0.993 (bench/results/faiss_1m.json). Training takes seconds to minutes, so ``reindex`` builds the new
    index beside the serving one and swaps it in under the lock, replaying what changed meanwhile.
    """

    def __init__(
        self,
        dim: int,
        device: DeviceCopy | Literal["auto"] | None = "auto",
        ivf_from: int = 0,
        nprobe: int = 16,
    ) -> None:
        self.dim = dim
        self.ivf_from = ivf_from  # 0: always exact
        self.nprobe = nprobe
        self._index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._trained_for = 0  # entries the current IVF was trained on; 0 while exact
        self._reindexing = threading.Lock()
        self._to_device = gpu_device_copy() if device == "auto" else device
        self._device_index: faiss.Index | None = None  # the search copy; None until needed or after an eviction
        self._ids: dict[int, IndexEntry] = {}
        self._by_upload: dict[str, int] = {}
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, upload_id: object) -> bool:
        return upload_id in self._by_upload

    def add(self, entries: list[IndexEntry]) -> int:
        """Adds entries not already present; re-adding an upload_id is a no-op (redelivery is idempotent)."""
        with self._lock:
            fresh = [e for e in entries if e.upload_id not in self._by_upload]
            unique: dict[str, IndexEntry] = {}
            for e in fresh:
                unique.setdefault(e.upload_id, e)
            if not unique:
                return 0
            ids = np.arange(self._next, self._next + len(unique), dtype=np.int64)
            vectors = np.stack([e.vector for e in unique.values()]).astype(np.float32)
            if vectors.shape[1] != self.dim:
                raise ValueError(f"vector dim {vectors.shape[1]} != index dim {self.dim}")
            self._index.add_with_ids(vectors, ids)
            if self._device_index is not None:
                self._device_index.add_with_ids(vectors, ids)
            for i, e in zip(ids.tolist(), unique.values(), strict=True):
                self._ids[i] = e
                self._by_upload[e.upload_id] = i
            self._next += len(unique)
            return len(unique)

    def search(self, vectors: NDArray[Any], k: int) -> list[list[Neighbour]]:
        with self._lock:
            if not self._ids or len(vectors) == 0:
                return [[] for _ in range(len(vectors))]
            index = self._search_index()
            scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(self._ids)))
            return [
                [Neighbour(self._ids[i].upload_id, float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
                for row_s, row_i in zip(scores, ids, strict=True)
            ]

    def get(self, upload_ids: list[str]) -> list[IndexEntry]:
        """The entries of those uploads that are here."""
        with self._lock:
            return [self._ids[self._by_upload[u]] for u in upload_ids if u in self._by_upload]

    def evict_older_than(self, cutoff: float) -> int:
        with self._lock:
            old = [i for i, e in self._ids.items() if e.added_at < cutoff]
            if old:
                self._index.remove_ids(np.asarray(old, dtype=np.int64))  # type: ignore[arg-type]
                self._device_index = None
                for i in old:
                    entry = self._ids.pop(i)
                    self._by_upload.pop(entry.upload_id, None)
            return len(old)

    def entries(self) -> list[IndexEntry]:
        with self._lock:
            return list(self._ids.values())

    @property
    def on_device(self) -> bool:
        return self._to_device is not None

    def _search_index(self) -> faiss.Index:
        if self._to_device is None:
            return self._index
        if self._device_index is None:
            self._device_index = self._to_device(self._index)
        return self._device_index

    @property
    def kind(self) -> str:
        return f"IVF{faiss.extract_index_ivf(self._index).nlist},Flat" if self._trained_for else "Flat"

    def reindex_due(self) -> bool:
        """Past ``ivf_from`` and never trained, or twice as large as when last trained."""
        n = len(self._ids)
        return self.ivf_from > 0 and n >= self.ivf_from and n >= 2 * self._trained_for

    def reindex(self) -> bool:
        """Trains an IVF on the current entries beside the serving index, then swaps it in; False if not due."""
        if not self._reindexing.acquire(blocking=False):
            return False
        try:
            with self._lock:
                if not self.reindex_due():
                    return False
                ids = np.fromiter(self._ids, dtype=np.int64, count=len(self._ids))
                vectors = np.stack([self._ids[int(i)].vector for i in ids]).astype(np.float32)
                seen_next = self._next
            ivf = self._build_ivf(ids, vectors)  # outside the lock: searches and additions go on meanwhile
            del vectors
            with self._lock:
                # Replay what happened while it trained: additions after seen_next, and evictions.
                added = [i for i in range(seen_next, self._next) if i in self._ids]
                if added:
                    more = np.stack([self._ids[i].vector for i in added]).astype(np.float32)
                    ivf.add_with_ids(more, np.asarray(added, dtype=np.int64))
                gone = [int(i) for i in ids if int(i) not in self._ids]
                if gone:
                    ivf.remove_ids(np.asarray(gone, dtype=np.int64))  # type: ignore[arg-type]
                self._index, self._device_index, self._trained_for = ivf, None, len(ids)
            return True
        finally:
            self._reindexing.release()

    def _build_ivf(self, ids: NDArray[np.int64], vectors: NDArray[np.float32]) -> faiss.Index:
        nlist = max(1, int(4 * np.sqrt(len(ids))))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(vectors[np.random.default_rng(0).permutation(len(vectors))[: 64 * nlist]])
        ivf.add_with_ids(vectors, ids)
        ivf.nprobe = self.nprobe
        return ivf

    def reindex_in_background(self) -> threading.Thread | None:
        """Starts ``reindex`` on a thread when it is due; searches keep using the current index meanwhile."""
        if not self.reindex_due() or self._reindexing.locked():
            return None
        thread = threading.Thread(target=self.reindex, name="faiss-reindex", daemon=True)
        thread.start()
        return thread
