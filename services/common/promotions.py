"""Admin promotion requests and what became of each: written by the reviewer and the trainer, read by both.

The reviewer's admin API appends a request to a stream and the trainer consumes it with a consumer group, so a
request survives a trainer that is down or crashes mid-way. Each request's outcome is kept in a hash next to it,
because a stream entry is gone once trimmed and the admin needs to see why a promotion was refused.

Keys (``<prefix>`` is SIEVE_REDIS_KEY_PREFIX):

- ``<prefix>:trainer:promotion-requests``  stream  fields model, version, reason, requested_by
- ``<prefix>:trainer:promotion-state``     hash    request id (the stream entry id) -> PromotionRecord JSON
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any, cast

import redis
from pydantic import BaseModel

from services.common.redis_text import text


class PromotionState(StrEnum):
    REQUESTED = "requested"
    RUNNING = "running"
    PROMOTED = "promoted"
    REFUSED = "refused"


FINAL_STATES = frozenset({PromotionState.PROMOTED, PromotionState.REFUSED})


class PromotionRecord(BaseModel):
    """One request as the admin sees it; ``detail`` says why it was refused (or what was promoted)."""

    request_id: str
    model: str
    version: str
    reason: str = ""
    requested_by: str = ""
    state: PromotionState = PromotionState.REQUESTED
    detail: str = ""
    attempts: int = 0
    requested_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    from_version: int | None = None


def requests_key(prefix: str) -> str:
    return f"{prefix}:trainer:promotion-requests"


def state_key(prefix: str) -> str:
    return f"{prefix}:trainer:promotion-state"


def entry_time(request_id: str) -> float:
    """A stream entry id starts with the Redis server's clock in milliseconds."""
    return int(request_id.split("-", 1)[0]) / 1000.0


class PromotionLedger:
    """The stream of requests and the state of each; the only code that knows their Redis layout."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.stream = requests_key(prefix)
        self.states = state_key(prefix)

    def request(self, model: str, version: str, reason: str, requested_by: str) -> PromotionRecord:
        """Appends the request and records it as requested, so it is listed before the trainer sees it."""
        fields: dict[Any, Any] = {"model": model, "version": version, "reason": reason, "requested_by": requested_by}
        request_id = text(self.client.xadd(self.stream, fields))
        record = self.from_entry(request_id, fields)
        # Only if absent: a fast trainer may already have moved the request on from "requested".
        self.client.hsetnx(self.states, request_id, record.model_dump_json())
        return record

    @staticmethod
    def from_entry(request_id: str, fields: dict[Any, Any]) -> PromotionRecord:
        values = {text(k): text(v) for k, v in fields.items()}
        at = entry_time(request_id)
        return PromotionRecord(
            request_id=request_id,
            model=values.get("model", ""),
            version=values.get("version", ""),
            reason=values.get("reason", ""),
            requested_by=values.get("requested_by", ""),
            requested_at=at,
            updated_at=at,
        )

    def save(self, record: PromotionRecord) -> None:
        self.client.hset(self.states, record.request_id, record.model_dump_json())

    def get(self, request_id: str) -> PromotionRecord | None:
        raw = cast(bytes | None, self.client.hget(self.states, request_id))
        return PromotionRecord.model_validate_json(raw) if raw else None

    def transition(self, record: PromotionRecord, state: PromotionState, **changes: Any) -> PromotionRecord:
        """Saves the record in its new state with the time it changed."""
        now = time.time()
        stamps: dict[str, Any] = {"updated_at": now}
        if state == PromotionState.RUNNING:
            stamps["started_at"] = now
        if state in FINAL_STATES:
            stamps["finished_at"] = now
        updated = record.model_copy(update={"state": state, **stamps, **changes})
        self.save(updated)
        return updated

    def recent(self, count: int = 20) -> list[PromotionRecord]:
        """Newest first (stream ids sort by time)."""
        raw = cast(dict[bytes, bytes], self.client.hgetall(self.states))
        records = [PromotionRecord.model_validate_json(v) for v in raw.values()]
        records.sort(key=lambda r: tuple(int(p) for p in r.request_id.split("-")), reverse=True)
        return records[:count]
