"""Reference features in Redis: written once when an upload enters the index, read for its future matches."""

from __future__ import annotations

import logging
from typing import cast

import redis

from services.common.verification.features import LocalFeatures

log = logging.getLogger(__name__)


def features_key(prefix: str, upload_id: str) -> str:
    # Features do not depend on the embedder version: one record serves every version's index.
    return f"{prefix}:features:{upload_id}"


class FeatureStore:
    """One binary value per upload, expiring with the retention window like the index entries."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s

    def put_many(self, features: dict[str, LocalFeatures]) -> None:
        if not features:
            return
        pipe = self.client.pipeline(transaction=False)
        for upload_id, feats in features.items():
            pipe.set(features_key(self.prefix, upload_id), feats.to_bytes(), ex=self.ttl_s)
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
