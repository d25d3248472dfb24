"""The index's durable form in Redis: a stream of additions and a snapshot, per model version.

Vectors are raw little-endian float32 bytes and metadata is JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, cast

import numpy as np
import redis

from services.common.index.base import IndexEntry, Snapshot

# 16 MiB per block: far under Redis's 512 MB value cap, and a reader holds one block of raw bytes at a time.
SNAPSHOT_BLOCK_BYTES = 16 * 1024 * 1024
SNAPSHOT_READ_ATTEMPTS = 5
UNFINISHED_GENERATION_TTL_S = 3600
RETIRED_GENERATION_TTL_S = 120


class RedisIndexStore:
    def __init__(
        self, client: redis.Redis, prefix: str, model_version: str, block_bytes: int = SNAPSHOT_BLOCK_BYTES
    ) -> None:
        self.client = client
        self.block_bytes = block_bytes
        base = f"{prefix}:index:{model_version}"
        self.stream_key = f"{base}:stream"
        self.snapshot_key = f"{base}:snapshot"
        self.current_key = f"{self.snapshot_key}:current"
        self.lock_key = f"{base}:compactor-lock"

    def dim(self) -> int | None:
        """The vectors' dimension, read from the stream or the snapshot (None: nothing stored yet)."""
        tail, _ = self.read_since("0-0", 1)
        if tail:
            return int(tail[0].vector.shape[0])
        snapshot = self.load_snapshot()
        if snapshot is not None and snapshot.entries:
            return int(snapshot.entries[0].vector.shape[0])
        return None

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
        """Reads the current generation block by block; starts over if a compactor retired it mid-read."""
        for _ in range(SNAPSHOT_READ_ATTEMPTS):
            generation = cast(bytes | None, self.client.get(self.current_key))
            if generation is None:
                return None
            snapshot = self._read_generation(generation.decode())
            if snapshot is not None:
                return snapshot
        raise RuntimeError(f"{self.snapshot_key}: snapshot kept changing while it was read")

    def _read_generation(self, generation: str) -> Snapshot | None:
        key = self._generation_key(generation)
        raw_meta = cast(bytes | None, self.client.hget(key, "meta"))
        if raw_meta is None:
            return None
        meta = json.loads(raw_meta)
        dim = int(meta["dim"])
        entries: list[IndexEntry] = []
        for block in range(int(meta["blocks"])):
            ids, times, blob = cast(
                list[bytes | None], self.client.hmget(key, [f"ids:{block}", f"t:{block}", f"v:{block}"])
            )
            if ids is None or times is None or blob is None:
                return None
            vectors = np.frombuffer(blob, dtype="<f4").reshape(-1, dim)
            entries.extend(
                IndexEntry(upload_id, vectors[i].astype(np.float32), float(t))
                for i, (upload_id, t) in enumerate(zip(json.loads(ids), json.loads(times), strict=True))
            )
        if len(entries) != int(meta["count"]):
            return None
        return Snapshot(entries=entries, stream_id=str(meta["stream_id"]))

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """Writes a new generation in blocks, then switches to it in one MULTI.

        Redis caps one value at 512 MB and a 1M x 256-d float32 snapshot is 1 GB, so vectors go in blocks of
        ``block_bytes``. Readers only ever follow the pointer to a complete generation; the retired one expires
        after a grace period so a reader that is mid-way can finish.
        """
        entries = snapshot.entries
        dim = int(entries[0].vector.shape[0]) if entries else 0
        rows = max(1, self.block_bytes // max(1, dim * 4))
        generation = f"{snapshot.stream_id}.{uuid.uuid4().hex[:8]}"
        key = self._generation_key(generation)
        blocks = 0
        for start in range(0, len(entries), rows):
            part = entries[start : start + rows]
            vectors = np.stack([e.vector for e in part]).astype("<f4")
            self.client.hset(
                key,
                mapping={
                    f"ids:{blocks}": json.dumps([e.upload_id for e in part]),
                    f"t:{blocks}": json.dumps([e.added_at for e in part]),
                    f"v:{blocks}": vectors.tobytes(),
                },
            )
            # A writer that dies part-way leaves nothing behind for long.
            self.client.expire(key, UNFINISHED_GENERATION_TTL_S)
            blocks += 1
        meta = {"dim": dim, "count": len(entries), "blocks": blocks, "stream_id": snapshot.stream_id}
        previous = cast(bytes | None, self.client.get(self.current_key))
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, "meta", json.dumps(meta))
        pipe.persist(key)
        pipe.set(self.current_key, generation)
        pipe.set(f"{self.snapshot_key}:sid", snapshot.stream_id)
        if previous is not None and previous.decode() != generation:
            pipe.expire(self._generation_key(previous.decode()), RETIRED_GENERATION_TTL_S)
        pipe.execute()

    def delete_snapshot(self) -> None:
        generation = cast(bytes | None, self.client.get(self.current_key))
        keys = [self.current_key, f"{self.snapshot_key}:sid"]
        if generation is not None:
            keys.append(self._generation_key(generation.decode()))
        self.client.delete(*keys)

    def _generation_key(self, generation: str) -> str:
        return f"{self.snapshot_key}:gen:{generation}"

    def first_id(self) -> str | None:
        """The oldest entry still in the stream, or None when it is empty."""
        first = cast(list[tuple[bytes, Any]], self.client.xrange(self.stream_key, min="-", max="+", count=1))
        return first[0][0].decode() if first else None

    def snapshot_id(self) -> str:
        value = cast(bytes | None, self.client.get(f"{self.snapshot_key}:sid"))
        return value.decode() if value else "0-0"

    def trim_before(self, stream_id: str) -> int:
        return int(self.client.xtrim(self.stream_key, minid=stream_id, approximate=False))

    def stream_length(self) -> int:
        return int(self.client.xlen(self.stream_key))

    def clear_stream(self) -> None:
        self.client.delete(self.stream_key)

    def acquire_compactor_lock(self, owner: str, ttl_s: int) -> bool:
        return bool(self.client.set(self.lock_key, owner, nx=True, ex=ttl_s))

    def release_compactor_lock(self, owner: str) -> None:
        current = cast(bytes | None, self.client.get(self.lock_key))
        if current is not None and current.decode() == owner:
            self.client.delete(self.lock_key)
