"""Hash banks of known violating content (Hasher-Matcher-Actioner's "bank"): managed by admins, matched per upload.

Layout in Redis: ``<prefix>:banks`` maps bank name to JSON metadata (enabled, description); for each hash, a set
``<prefix>:bankhash:<kind>:<hash>`` names the banks holding it, so matching costs one lookup per hash.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal, cast

import redis

HashKind = Literal["sha256", "phash"]


@dataclass(frozen=True)
class Bank:
    name: str
    enabled: bool
    description: str
    created_at: float
    size: int


class HashBankStore:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.meta_key = f"{prefix}:banks"

    def _hash_key(self, kind: HashKind, value: str) -> str:
        return f"{self.prefix}:bankhash:{kind}:{value}"

    def _members_key(self, name: str) -> str:
        return f"{self.prefix}:bank:{name}:members"

    def create(self, name: str, description: str = "") -> Bank:
        meta = {"enabled": True, "description": description, "created_at": time.time()}
        self.client.hsetnx(self.meta_key, name, json.dumps(meta))
        return self.get(name)

    def get(self, name: str) -> Bank:
        raw = cast(bytes | None, self.client.hget(self.meta_key, name))
        if raw is None:
            raise KeyError(f"no bank named {name!r}")
        meta = json.loads(raw)
        size = int(self.client.scard(self._members_key(name)))
        return Bank(name, bool(meta["enabled"]), str(meta["description"]), float(meta["created_at"]), size)

    def all_banks(self) -> list[Bank]:
        names = sorted(n.decode() for n in cast(dict[bytes, bytes], self.client.hgetall(self.meta_key)))
        return [self.get(n) for n in names]

    def set_enabled(self, name: str, enabled: bool, description: str | None = None) -> Bank:
        bank = self.get(name)
        meta = {
            "enabled": enabled,
            "description": bank.description if description is None else description,
            "created_at": bank.created_at,
        }
        self.client.hset(self.meta_key, name, json.dumps(meta))
        return self.get(name)

    def add_hashes(self, name: str, hashes: list[tuple[HashKind, str]]) -> int:
        self.get(name)
        pipe = self.client.pipeline(transaction=True)
        for kind, value in hashes:
            pipe.sadd(self._hash_key(kind, value), name)
            pipe.sadd(self._members_key(name), f"{kind}:{value}")
        pipe.execute()
        return len(hashes)

    def remove(self, name: str) -> None:
        members = cast(set[bytes], self.client.smembers(self._members_key(name)))
        pipe = self.client.pipeline(transaction=True)
        for member in members:
            kind, value = member.decode().split(":", 1)
            pipe.srem(self._hash_key(cast(HashKind, kind), value), name)
        pipe.delete(self._members_key(name))
        pipe.hdel(self.meta_key, name)
        pipe.execute()

    def match(self, sha256: str, phash: str | None) -> list[str]:
        """Enabled banks holding either hash; empty when none. Sorted for stable verdict reasons."""
        pipe = self.client.pipeline(transaction=False)
        pipe.smembers(self._hash_key("sha256", sha256))
        if phash is not None:
            pipe.smembers(self._hash_key("phash", phash))
        found: set[str] = set()
        for members in pipe.execute():
            found |= {m.decode() for m in members}
        if not found:
            return []
        raw = cast(list[bytes | None], self.client.hmget(self.meta_key, sorted(found)))
        return [name for name, meta in zip(sorted(found), raw, strict=True) if meta and json.loads(meta)["enabled"]]
