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

    def first_id(self) -> str | None: ...

    def snapshot_id(self) -> str: ...

    def stream_length(self) -> int: ...

    def clear_stream(self) -> None: ...

    def acquire_compactor_lock(self, owner: str, ttl_s: int) -> bool: ...

    def release_compactor_lock(self, owner: str) -> None: ...


class RecentIndex(Protocol):
    """A replica's handle on the shared recent-images index of one model version, whatever backs it.

    Two implementations: ``FaissRedisIndex`` (FAISS in every replica, in step through Redis) and
    ``MilvusRecentIndex`` (one Milvus collection that every replica queries). Both give read-your-writes across
    replicas: an entry ``add`` returned for is found by any replica's next ``search``.
    """

    model_version: str
    retention_s: int
    last_sync: float  # unix seconds of the last successful exchange with the shared store (0: never)

    def sync(self) -> bool:
        """Catches up with other replicas where that is needed; False while the shared store is unreachable."""
        ...

    def search(self, vectors: NDArray[Any], k: int, exclude: list[str] | None = None) -> list[list[Neighbour]]:
        """Top-k per query row by cosine, within the retention window, never ``exclude[i]`` for row i."""
        ...

    def vectors(self, upload_ids: list[str]) -> dict[str, NDArray[Any]]:
        """The stored vectors of those uploads still in the window (a candidate found by other means needs its
        cosine); unknown ids are left out."""
        ...

    def add(self, entries: list[IndexEntry]) -> None:
        """Shares the entries (an upload id already present is overwritten, so redelivery is idempotent)."""
        ...

    def maintain(self) -> None:
        """Periodic upkeep: retention, re-indexing, compaction; the moderator's loop calls it every sync interval."""
        ...

    def entries(self) -> list[IndexEntry]:
        """The whole retention window (a promotion's backfill re-embeds it)."""
        ...

    def replace(self, entries: list[IndexEntry]) -> None:
        """Makes ``entries`` the whole index: a backfill of a version that serves no traffic yet."""
        ...

    def __len__(self) -> int: ...
