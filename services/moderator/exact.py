"""Exact re-uploads skip the model: the first upload of each sha256 (and pHash) is remembered in Redis."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

import redis


@dataclass(frozen=True)
class KnownUpload:
    upload_id: str
    action: str
    model_version: str
    flags: dict[str, float]


class ExactMatchStore:
    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int) -> None:
        self.client = client
        self.prefix = f"{prefix}:exact"
        self.ttl_s = ttl_s

    def lookup(self, sha256: str, phash: str | None) -> tuple[KnownUpload, str] | None:
        """The earlier upload with the same bytes (preferred) or the same perceptual hash, and which hash matched."""
        keys = [f"{self.prefix}:sha256:{sha256}"] + ([f"{self.prefix}:phash:{phash}"] if phash else [])
        raw = cast(list[bytes | None], self.client.mget(keys))
        for value, kind in zip(raw, ("sha256", "phash"), strict=False):
            if value:
                data = json.loads(value)
                return KnownUpload(data["upload_id"], data["action"], data["model_version"], data["flags"]), kind
        return None

    def remember(self, sha256: str, phash: str | None, known: KnownUpload) -> None:
        """First writer wins (NX): a later identical upload always points at the original."""
        value = json.dumps(known.__dict__)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(f"{self.prefix}:sha256:{sha256}", value, nx=True, ex=self.ttl_s)
        if phash:
            pipe.set(f"{self.prefix}:phash:{phash}", value, nx=True, ex=self.ttl_s)
        pipe.execute()
