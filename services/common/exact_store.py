"""Exact re-uploads skip the model: the first upload of each sha256 (and pHash) is remembered in Redis.

The one owner of ``<prefix>:exact:<sha256|phash>:<value>``: the moderator writes and reads it, re-judging reads it.
"""

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
                return _known(value), kind
        return None

    def first_uploads(self, kind: str, values: list[str]) -> dict[str, KnownUpload]:
        """value -> the first upload with that hash (``kind``: sha256 or phash), for the values remembered."""
        if not values:
            return {}
        raw = cast(list[bytes | None], self.client.mget([f"{self.prefix}:{kind}:{v}" for v in values]))
        return {v: _known(value) for v, value in zip(values, raw, strict=True) if value}

    def remember(self, sha256: str, phash: str | None, known: KnownUpload) -> None:
        """First writer wins (NX): a later identical upload always points at the original."""
        value = json.dumps(known.__dict__)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(f"{self.prefix}:sha256:{sha256}", value, nx=True, ex=self.ttl_s)
        if phash:
            pipe.set(f"{self.prefix}:phash:{phash}", value, nx=True, ex=self.ttl_s)
        pipe.execute()


def _known(value: bytes) -> KnownUpload:
    data = json.loads(value)
    return KnownUpload(data["upload_id"], data["action"], data["model_version"], data["flags"])
