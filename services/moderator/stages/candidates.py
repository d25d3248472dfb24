"""Where the references an upload may copy come from: the recent index's nearest embeddings (first pass), and,
where those leave it unsure, the references that share its keypoints (second pass)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from services.common.index import IndexEntry, Neighbour, RecentIndex
from services.common.index.batch import with_batch_neighbours
from services.common.verification import LocalFeatures, SharedKeypointIndex, Verifier
from services.moderator.stages.envelope import Item


@dataclass
class FirstPass:
    """One upload's nearest references, the batch's earlier uploads among them."""

    neighbours: list[Neighbour]
    entry: IndexEntry  # what the upload adds to the index once its verdict is acknowledged
    search_ms: float
    began_ns: int
    ended_ns: int


def embedding_of(item: Item) -> NDArray[np.float32]:
    assert item.inferred is not None
    row: NDArray[np.float32] = item.inferred.result.embeddings[item.inferred.row]
    return row


def first_pass(index: RecentIndex, group: list[Item], top_k: int) -> list[FirstPass]:
    """One search for the whole group (one round trip to a remote index); each item also sees the items before
    it in the batch, which the shared index has not got yet."""
    began = time.perf_counter()
    vectors = np.stack([embedding_of(i) for i in group])
    shared = index.search(vectors, top_k, exclude=[i.upload_id for i in group])
    per_item_ms = (time.perf_counter() - began) * 1000.0 / len(group)
    earlier: list[IndexEntry] = []
    out = []
    for position, item in enumerate(group):
        t0, began = time.time_ns(), time.perf_counter()
        neighbours = with_batch_neighbours(shared[position], vectors[position], earlier, top_k)
        entry = IndexEntry(item.upload_id, vectors[position], time.time())
        earlier.append(entry)
        search_ms = round(per_item_ms + (time.perf_counter() - began) * 1000.0, 3)
        out.append(FirstPass(neighbours, entry, search_ms, t0, time.time_ns()))
    return out


class KeypointChannel:
    """The second pass: references sharing the upload's keypoints (a crop inside a meme, a chain of edits the
    descriptor lost), with their cosines from the index. Raises TransientError when the index is unreachable."""

    def __init__(self, verifier: Verifier, keypoints: SharedKeypointIndex) -> None:
        self.verifier = verifier
        self.keypoints = keypoints

    def neighbours(
        self, features: LocalFeatures, embedding: NDArray[np.float32], exclude: set[str], index: RecentIndex
    ) -> list[Neighbour]:
        return self.verifier.keypoint_neighbours(self.keypoints.index, features, embedding, exclude, index.vectors)
