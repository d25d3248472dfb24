"""The recent uploads' PDQ hashes, kept for the retention window: what re-judging searches when a bank grows.

The one owner of ``<prefix>:recent:pdq`` (a Redis stream trimmed by age): the moderator appends to it after each
batch's verdicts are acknowledged, re-judging reads it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import cast

import redis


@dataclass(frozen=True)
class RecentPdq:
    upload_id: str
    pdq: str
    model_version: str
    flags: dict[str, float]


class RecentPdqLog:
    def __init__(self, client: redis.Redis, prefix: str, retention_s: int) -> None:
        self.client = client
        self.key = f"{prefix}:recent:pdq"
        self.retention_s = retention_s

    def append(
        self, pipe: redis.client.Pipeline, upload_id: str, pdq: str, model_version: str, flags: dict[str, float]
    ) -> None:
        """Queued on ``pipe`` (the caller's batch of writes); entries older than the retention window go."""
        fields = {"u": upload_id, "p": pdq, "m": model_version, "f": json.dumps(flags)}
        minid = f"{int((time.time() - self.retention_s) * 1000)}-0"
        pipe.xadd(self.key, fields, minid=minid, approximate=True)  # type: ignore[arg-type]

    def entries(self) -> list[RecentPdq]:
        rows = cast(list[tuple[bytes, dict[bytes, bytes]]], self.client.xrange(self.key))
        return [RecentPdq(f[b"u"].decode(), f[b"p"].decode(), f[b"m"].decode(), json.loads(f[b"f"])) for _, f in rows]
