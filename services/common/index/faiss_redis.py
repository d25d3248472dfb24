"""A replica's view of the shared index: snapshot + stream tail from Redis, with a local buffer for outages."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from typing import Any

import redis
from numpy.typing import NDArray

from services.common.errors import TransientError
from services.common.index.base import IndexEntry, IndexStore, Neighbour, Snapshot
from services.common.index.faiss_index import FaissVectorIndex
from services.common.index.redis_store import RedisIndexStore

log = logging.getLogger(__name__)
READ_COUNT = 10_000


def stream_id_key(stream_id: str) -> tuple[int, int]:
    """Redis stream ids order by (milliseconds, sequence), not as strings."""
    ms, _, seq = stream_id.partition("-")
    return int(ms or 0), int(seq or 0)


class FaissRedisIndex:
    """Every replica sees every recent image: it replays others' additions before each search.

    If Redis is down, additions wait in ``pending`` and searches use the local index; both catch up later.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        model_version: str,
        dim: int,
        retention_s: int,
        ivf_from: int = 0,
        nprobe: int = 16,
        snapshot_every: int = 5000,
    ) -> None:
        self.model_version = model_version
        self.snapshot_every = snapshot_every
        self.store: IndexStore = RedisIndexStore(client, prefix, model_version)
        self.local = FaissVectorIndex(dim, ivf_from=ivf_from, nprobe=nprobe)
        self.retention_s = retention_s
        self.stream_id = "0-0"
        self.pending: deque[IndexEntry] = deque()
        self.loaded = False
        self.redis_ok = True
        self.rebuilds = 0
        self.last_sync = 0.0
        self._lock = threading.Lock()
        self._owner = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def __len__(self) -> int:
        return len(self.local)

    def _new_local(self) -> FaissVectorIndex:
        """An empty index like the current one (a rebuild must not lose the IVF setting)."""
        return FaissVectorIndex(self.local.dim, ivf_from=self.local.ivf_from, nprobe=self.local.nprobe)

    def _load(self) -> None:
        snapshot = self.store.load_snapshot()
        if snapshot is not None:
            self.local.add(snapshot.entries)
            self.stream_id = snapshot.stream_id
        self.loaded = True

    def _rebuild_if_trimmed_past_us(self) -> None:
        """A compactor trimmed entries this replica never read: rebuild from the snapshot, then swap.

        The new index is built beside the old one (which keeps serving searches), so peak memory is twice the
        index for the moment of the swap, never more.
        """
        ours = stream_id_key(self.stream_id)
        first = self.store.first_id()
        # Trimming keeps every entry from the snapshot point on, so if the oldest entry left is newer than our
        # position (or the stream is empty behind a newer snapshot), entries we never read were trimmed.
        trimmed = stream_id_key(first) > ours if first else stream_id_key(self.store.snapshot_id()) > ours
        if not trimmed:
            return
        snapshot = self.store.load_snapshot()
        if snapshot is None:
            return
        fresh = self._new_local()
        fresh.add(snapshot.entries)
        fresh.add([e for e in self.local.entries() if e.upload_id not in fresh])  # keep what only we have
        log.info(
            "index %s: rebuilt from snapshot at %s (was at %s)", self.model_version, snapshot.stream_id, self.stream_id
        )
        self.local, self.stream_id = fresh, snapshot.stream_id
        self.rebuilds += 1

    def sync(self) -> bool:
        """Flushes pending additions and replays the stream tail; False while Redis is unreachable."""
        with self._lock:
            try:
                if not self.loaded:
                    self._load()
                self._rebuild_if_trimmed_past_us()
                while self.pending:
                    batch = list(self.pending)
                    self.store.append(batch)
                    for _ in batch:
                        self.pending.popleft()
                while True:
                    entries, last = self.store.read_since(self.stream_id, READ_COUNT)
                    if not entries:
                        break
                    self.local.add(entries)
                    self.stream_id = last
                    if len(entries) < READ_COUNT:
                        break
                self.last_sync = time.time()
                if not self.redis_ok:
                    log.info("index: Redis reachable again; caught up to %s", self.stream_id)
                self.redis_ok = True
                return True
            except redis.RedisError as exc:
                if self.redis_ok:
                    log.warning("index: Redis unavailable (%s); serving from the local index", exc)
                self.redis_ok = False
                return False

    def search(self, vectors: NDArray[Any], k: int, exclude: list[str] | None = None) -> list[list[Neighbour]]:
        """Top-k neighbours per vector, never the query's own upload (redelivered work is idempotent)."""
        results = self.local.search(vectors, k + 1)
        out = []
        for i, row in enumerate(results):
            own = exclude[i] if exclude else None
            out.append([n for n in row if n.upload_id != own][:k])
        return out

    def vectors(self, upload_ids: list[str]) -> dict[str, NDArray[Any]]:
        cutoff = time.time() - self.retention_s
        return {e.upload_id: e.vector for e in self.local.get(upload_ids) if e.added_at >= cutoff}

    def add(self, entries: list[IndexEntry]) -> None:
        """Local first (so the next item of this batch sees it), then Redis, or the pending buffer."""
        self.local.add(entries)
        with self._lock:
            self.pending.extend(entries)
        self.sync()

    def compact(self, now: float | None = None, lock_ttl_s: int = 60) -> int | None:
        """Writes a snapshot of the retention window and trims the stream; one replica at a time."""
        now = time.time() if now is None else now
        if not self.store.acquire_compactor_lock(self._owner, lock_ttl_s):
            return None
        try:
            self.sync()
            cutoff = now - self.retention_s
            with self._lock:
                self.local.evict_older_than(cutoff)
                snapshot = Snapshot(entries=self.local.entries(), stream_id=self.stream_id)
            self.store.write_snapshot(snapshot)
            self.store.trim_before(snapshot.stream_id)
            return len(snapshot.entries)
        finally:
            self.store.release_compactor_lock(self._owner)

    def maintain(self) -> None:
        """Catch up, drop what left the window, turn exact -> IVF off the caller's thread, compact the stream."""
        self.sync()
        self.local.evict_older_than(time.time() - self.retention_s)
        if self.local.reindex_in_background():  # past SIEVE_INDEX_IVF_FROM
            log.info("index %s: training IVF for %d entries in the background", self.model_version, len(self))
        try:
            if self.store.stream_length() >= self.snapshot_every:
                self.compact()
        except redis.RedisError:
            pass

    def entries(self) -> list[IndexEntry]:
        if not self.sync():
            raise TransientError("redis", f"cannot read the shared index of {self.model_version}")
        cutoff = time.time() - self.retention_s
        return [e for e in self.local.entries() if e.added_at >= cutoff]

    def replace(self, entries: list[IndexEntry]) -> None:
        """A snapshot at stream position 0 and no stream: replicas that later open this version load exactly these
        entries (a stream left by an earlier attempt would otherwise be replayed on top)."""
        self.store.clear_stream()
        self.store.write_snapshot(Snapshot(entries=entries, stream_id="0-0"))
