"""The seams: what a vector index and an index log must do. One real implementation of each sits beside."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from numpy.typing import NDArray


@dataclass(frozen=True)
class Neighbour:
    upload_id: str
    score: float  # cosine similarity, 1.0 = identical embedding


@dataclass(frozen=True)
class IndexEntry:
    upload_id: str
    vector: NDArray[Any]  # float32, (d,)
    added_at: float  # unix seconds


class VectorIndex(Protocol):
    def add(self, entries: list[IndexEntry]) -> int: ...

    def search(self, vectors: NDArray[Any], k: int) -> list[list[Neighbour]]: ...

    def evict_older_than(self, cutoff: float) -> int: ...

    def entries(self) -> list[IndexEntry]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Snapshot:
    entries: list[IndexEntry]
    stream_id: str  # the last stream entry the snapshot includes


class IndexStore(Protocol):
    """Durable, shared record of the index: a snapshot plus an append-only stream of additions."""

    def append(self, entries: list[IndexEntry]) -> str: ...

    def read_since(self, stream_id: str, count: int) -> tuple[list[IndexEntry], str]: ...

    def load_snapshot(self) -> Snapshot | None: ...

    def write_snapshot(self, snapshot: Snapshot) -> None: ...

    def trim_before(self, stream_id: str) -> int: ...
