"""The index's durable form in Redis: a stream of additions and a snapshot, per model version.

Vectors are raw little-endian float32 bytes and metadata is JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from typing import Any, cast

import numpy as np
import redis

from services.common.index.base import IndexEntry, Snapshot


class RedisIndexStore:
    def __init__(self, client: redis.Redis, prefix: str, model_version: str) -> None:
        self.client = client
        base = f"{prefix}:index:{model_version}"
        self.stream_key = f"{base}:stream"
        self.snapshot_key = f"{base}:snapshot"
        self.lock_key = f"{base}:compactor-lock"

    def append(self, entries: list[IndexEntry]) -> str:
        pipe = self.client.pipeline(transaction=False)
        for e in entries:
            pipe.xadd(
                self.stream_key,
                {
                    "id": e.upload_id,
                    "v": np.asarray(e.vector, dtype="<f4").tobytes(),
                    "t": repr(e.added_at),
                },
            )
        results = pipe.execute()
        return str(results[-1].decode() if isinstance(results[-1], bytes) else results[-1]) if results else "0-0"

    def read_since(self, stream_id: str, count: int) -> tuple[list[IndexEntry], str]:
        raw = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            self.client.xrange(self.stream_key, min=f"({stream_id}", max="+", count=count),
        )
        entries: list[IndexEntry] = []
        last = stream_id
        for entry_id, fields in raw:
            last = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            entries.append(
                IndexEntry(
                    upload_id=fields[b"id"].decode(),
                    vector=np.frombuffer(fields[b"v"], dtype="<f4").astype(np.float32),
                    added_at=float(fields[b"t"]),
                )
            )
        return entries, last

    def load_snapshot(self) -> Snapshot | None:
        data = cast(dict[bytes, bytes], self.client.hgetall(self.snapshot_key))
        if not data:
            return None
        meta = json.loads(data[b"meta"])
        dim = int(meta["dim"])
        count = len(meta["ids"])
        vectors = np.frombuffer(data[b"vectors"], dtype="<f4").reshape(count, dim) if count else np.zeros((0, dim))
        entries = [
            IndexEntry(upload_id, vectors[i].astype(np.float32), float(t))
            for i, (upload_id, t) in enumerate(zip(meta["ids"], meta["added_at"], strict=True))
        ]
        return Snapshot(entries=entries, stream_id=str(meta["stream_id"]))

    def write_snapshot(self, snapshot: Snapshot) -> None:
        dim = int(snapshot.entries[0].vector.shape[0]) if snapshot.entries else 0
        vectors = (
            np.stack([e.vector for e in snapshot.entries]).astype("<f4")
            if snapshot.entries
            else np.zeros((0, dim), dtype="<f4")
        )
        meta = {
            "dim": dim,
            "ids": [e.upload_id for e in snapshot.entries],
            "added_at": [e.added_at for e in snapshot.entries],
            "stream_id": snapshot.stream_id,
        }
        # One MULTI so a reader never sees vectors from one snapshot with ids from another.
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.snapshot_key)
        pipe.hset(self.snapshot_key, mapping={"meta": json.dumps(meta), "vectors": vectors.tobytes()})
        pipe.set(f"{self.snapshot_key}:sid", snapshot.stream_id)
        pipe.execute()

    def first_id(self) -> str | None:
        """The oldest entry still in the stream, or None when it is empty."""
        first = cast(list[tuple[bytes, Any]], self.client.xrange(self.stream_key, min="-", max="+", count=1))
        return first[0][0].decode() if first else None

    def snapshot_id(self) -> str:
        value = cast(bytes | None, self.client.get(f"{self.snapshot_key}:sid"))
        return value.decode() if value else "0-0"

    def trim_before(self, stream_id: str) -> int:
        return int(self.client.xtrim(self.stream_key, minid=stream_id, approximate=False))

    def acquire_compactor_lock(self, owner: str, ttl_s: int) -> bool:
        return bool(self.client.set(self.lock_key, owner, nx=True, ex=ttl_s))

    def release_compactor_lock(self, owner: str) -> None:
        current = cast(bytes | None, self.client.get(self.lock_key))
        if current is not None and current.decode() == owner:
            self.client.delete(self.lock_key)
