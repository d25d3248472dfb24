"""Remembers the verdict published for each event_id, so a redelivered event republishes the same verdict."""

from __future__ import annotations

import logging

import redis

from services.common.schemas import Verdict

log = logging.getLogger(__name__)


class ProcessedEvents:
    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int) -> None:
        self.client = client
        self.prefix = f"{prefix}:event"
        self.ttl_s = ttl_s

    def get_many(self, event_ids: list[str]) -> dict[str, Verdict]:
        if not event_ids:
            return {}
        try:
            values = self.client.mget([f"{self.prefix}:{e}" for e in event_ids])
        except redis.RedisError as exc:
            log.warning("processed-events lookup skipped, Redis unavailable: %s", exc)
            return {}
        return {e: Verdict.model_validate_json(v) for e, v in zip(event_ids, values, strict=True) if v}

    def put_many(self, verdicts: list[Verdict]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for v in verdicts:
                pipe.set(f"{self.prefix}:{v.event_id}", v.model_dump_json(), ex=self.ttl_s)
            pipe.execute()
        except redis.RedisError as exc:
            # Losing this record only costs a recomputation on redelivery; outputs stay keyed by upload_id.
            log.warning("processed-events record skipped, Redis unavailable: %s", exc)
