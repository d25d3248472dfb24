"""Neighbours within one batch: entries decided moments ago that the shared index has not been given yet."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.common.index.base import IndexEntry, Neighbour


def with_batch_neighbours(
    found: list[Neighbour], vector: NDArray[Any], earlier: list[IndexEntry], k: int
) -> list[Neighbour]:
    """``found`` (from the shared index) merged with the batch's earlier entries, best first, top ``k``.

    Scores are inner products, as the indexes compute them on L2-normalised embeddings. An upload id in both
    keeps its higher score.
    """
    if not earlier:
        return found[:k]
    scores = np.stack([e.vector for e in earlier]).astype(np.float32) @ np.asarray(vector, dtype=np.float32)
    best = {n.upload_id: n for n in found}
    for entry, score in zip(earlier, scores, strict=True):
        known = best.get(entry.upload_id)
        if known is None or known.score < float(score):
            best[entry.upload_id] = Neighbour(entry.upload_id, float(score))
    return sorted(best.values(), key=lambda n: -n.score)[:k]
