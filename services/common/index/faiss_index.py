"""Exact inner-product FAISS index with string ids; searches run on a GPU copy when faiss-gpu sees a GPU.

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
    def __init__(self, dim: int, device: DeviceCopy | Literal["auto"] | None = "auto") -> None:
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
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
