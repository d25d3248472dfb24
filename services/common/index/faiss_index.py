"""Exact inner-product FAISS index with string ids; faiss-gpu is used automatically when a GPU is present."""

from __future__ import annotations

import threading
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

from services.common.index.base import IndexEntry, Neighbour

# One query at a time per batch item: OpenMP threads cost far more than they give on a shared 2-core machine
# (measured 27x slower single-vector searches with FAISS's default of 2 threads, bench/results/peers.json).
faiss.omp_set_num_threads(1)


class FaissVectorIndex:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
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
            for i, e in zip(ids.tolist(), unique.values(), strict=True):
                self._ids[i] = e
                self._by_upload[e.upload_id] = i
            self._next += len(unique)
            return len(unique)

    def search(self, vectors: NDArray[Any], k: int) -> list[list[Neighbour]]:
        with self._lock:
            if not self._ids or len(vectors) == 0:
                return [[] for _ in range(len(vectors))]
            scores, ids = self._index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(self._ids)))
            return [
                [Neighbour(self._ids[i].upload_id, float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
                for row_s, row_i in zip(scores, ids, strict=True)
            ]

    def evict_older_than(self, cutoff: float) -> int:
        with self._lock:
            old = [i for i, e in self._ids.items() if e.added_at < cutoff]
            if old:
                self._index.remove_ids(np.asarray(old, dtype=np.int64))  # type: ignore[arg-type]
                for i in old:
                    entry = self._ids.pop(i)
                    self._by_upload.pop(entry.upload_id, None)
            return len(old)

    def entries(self) -> list[IndexEntry]:
        with self._lock:
            return list(self._ids.values())
