"""Reference features in Redis: written once when an upload enters the index, read for its future matches.

Beside the records, a stream logs which uploads got features and when: every replica replays it into its
keypoint index (``SharedKeypointIndex``), so the second pass sees every recent upload, not only its own.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import redis

from services.common.verification.features import LocalFeatures

log = logging.getLogger(__name__)


def features_key(prefix: str, upload_id: str) -> str:
    # Features do not depend on the embedder version: one record serves every version's index.
    return f"{prefix}:features:{upload_id}"


def features_log_key(prefix: str) -> str:
    return f"{prefix}:features-log"


def stream_time(stream_id: str) -> float:
    """Unix seconds of a Redis stream id (its first part is the server's clock in milliseconds)."""
    return int(stream_id.split("-", 1)[0]) / 1000.0


class FeatureStore:
    """One binary value per upload, expiring with the retention window like the index entries."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.log_key = features_log_key(prefix)

    def put_many(self, features: dict[str, LocalFeatures]) -> None:
        if not features:
            return
        pipe = self.client.pipeline(transaction=False)
        for upload_id, feats in features.items():
            pipe.set(features_key(self.prefix, upload_id), feats.to_bytes(), ex=self.ttl_s)
            pipe.xadd(self.log_key, {"u": upload_id})
        pipe.execute()

    def get_many(self, upload_ids: list[str]) -> dict[str, LocalFeatures]:
        """Missing or unreadable records are left out: their candidates keep the descriptor's score."""
        if not upload_ids:
            return {}
        values = cast(list[bytes | None], self.client.mget([features_key(self.prefix, u) for u in upload_ids]))
        found: dict[str, LocalFeatures] = {}
        for upload_id, value in zip(upload_ids, values, strict=True):
            if value is None:
                continue
            try:
                found[upload_id] = LocalFeatures.from_bytes(value)
            except (ValueError, IndexError) as exc:
                log.error("unreadable features for %s: %s", upload_id, exc)
        return found

    def read_log(self, after: str, count: int) -> tuple[list[tuple[str, float]], str]:
        """(upload id, logged at) of up to ``count`` entries after stream id ``after``, and the last id read."""
        rows = cast(list[tuple[Any, dict[Any, Any]]], self.client.xrange(self.log_key, f"({after}", "+", count))
        out: list[tuple[str, float]] = []
        last = after
        for raw_id, fields in rows:
            last = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            value = fields.get(b"u", fields.get("u"))
            if value is not None:
                out.append((value.decode() if isinstance(value, bytes) else str(value), stream_time(last)))
        return out, last

    def trim_log(self, cutoff: float) -> int:
        """Drops log entries older than ``cutoff`` (unix seconds); their records have expired with them."""
        return int(self.client.xtrim(self.log_key, minid=f"{int(cutoff * 1000)}-0", approximate=False))
