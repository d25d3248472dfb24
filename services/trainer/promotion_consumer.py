"""Consumes the admin's promotion requests with a Redis consumer group, recording each one's state as it goes.

A request is acknowledged only once it has ended promoted or refused, so a trainer that dies mid-promotion
leaves it pending; another trainer claims it (XAUTOCLAIM) once it has been idle for ``claim_idle_s``. A request
that keeps failing for an unexpected reason is refused after ``max_attempts`` tries instead of blocking the rest.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import redis

from services.common.promotions import FINAL_STATES, PromotionLedger, PromotionRecord, PromotionState
from services.common.redis_text import text

log = logging.getLogger(__name__)
GROUP = "trainer"
# Longer than a promotion takes (backfill plus up to 180 s of Triton load), so a live trainer's request is never
# taken over; a dead trainer's waits this long for the next one.
CLAIM_IDLE_S = 900.0
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Outcome:
    state: PromotionState
    detail: str
    from_version: int | None = None


# Runs one request (already recorded as running) to its end; raises to have it retried later.
Handler = Callable[[PromotionRecord], Outcome]


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class PromotionConsumer:
    def __init__(
        self,
        ledger: PromotionLedger,
        handle: Handler,
        claim_idle_s: float = CLAIM_IDLE_S,
        max_attempts: int = MAX_ATTEMPTS,
        consumer: str | None = None,
    ) -> None:
        self.ledger = ledger
        self.client = ledger.client
        self.handle = handle
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.max_attempts = max_attempts
        self.consumer = consumer or consumer_name()
        self._group_ready = False

    def ensure_group(self) -> None:
        """From the stream's beginning: requests made before any trainer ever ran are not skipped."""
        if self._group_ready:
            return
        try:
            self.client.xgroup_create(self.ledger.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def poll(self, block_ms: int | None = None, count: int = 10) -> list[PromotionRecord]:
        """Claims stale requests, reads new ones, and runs each; returns the records that reached an end."""
        self.ensure_group()
        entries = self._claim_stale(count) + self._read_new(block_ms, count)
        done = [self.process(entry_id, fields) for entry_id, fields in entries]
        return [r for r in done if r is not None]

    def drain(self) -> list[PromotionRecord]:
        """Everything waiting now (``sieve trainer promotions``); returns once a poll finds nothing."""
        finished: list[PromotionRecord] = []
        while True:
            self.ensure_group()
            entries = self._claim_stale(10) + self._read_new(None, 10)
            if not entries:
                return finished
            finished.extend(r for r in (self.process(i, f) for i, f in entries) if r is not None)

    def _claim_stale(self, count: int) -> list[tuple[str, dict[Any, Any]]]:
        reply = self.client.xautoclaim(self.ledger.stream, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=count)
        claimed = cast(list[tuple[Any, dict[Any, Any] | None]], reply[1])
        stale = []
        for entry_id, fields in claimed:
            if fields is None:  # trimmed from the stream while pending: nothing left to run
                self.client.xack(self.ledger.stream, GROUP, entry_id)
                continue
            stale.append((text(entry_id), fields))
        return stale

    def _read_new(self, block_ms: int | None, count: int) -> list[tuple[str, dict[Any, Any]]]:
        reply = cast(
            list[tuple[Any, list[tuple[Any, dict[Any, Any]]]]] | None,
            self.client.xreadgroup(GROUP, self.consumer, {self.ledger.stream: ">"}, count=count, block=block_ms),
        )
        return [(text(entry_id), fields) for _, entries in reply or [] for entry_id, fields in entries]

    def process(self, entry_id: str, fields: dict[Any, Any]) -> PromotionRecord | None:
        """Runs one request; None when it stays pending (to be retried once it is idle long enough)."""
        record = self.ledger.get(entry_id) or PromotionLedger.from_entry(entry_id, fields)
        if record.state in FINAL_STATES:  # finished before a crash took the acknowledgement with it
            self._ack(entry_id)
            return record
        if record.attempts >= self.max_attempts:
            final = self.ledger.transition(
                record, PromotionState.REFUSED, detail=f"gave up after {record.attempts} attempts: {record.detail}"
            )
            self._ack(entry_id)
            return final
        record = self.ledger.transition(record, PromotionState.RUNNING, attempts=record.attempts + 1)
        log.info(
            "promotion request %s: %s version %s by %s", entry_id, record.model, record.version, record.requested_by
        )
        try:
            outcome = self.handle(record)
        except Exception as exc:  # retried later, and refused once the attempts run out
            log.exception("promotion request %s failed; it stays pending", entry_id)
            self.ledger.transition(record, PromotionState.RUNNING, detail=f"attempt {record.attempts} failed: {exc}")
            return None
        final = self.ledger.transition(record, outcome.state, detail=outcome.detail, from_version=outcome.from_version)
        self._ack(entry_id)
        log.info("promotion request %s %s: %s", entry_id, final.state.value, final.detail)
        return final

    def _ack(self, entry_id: str) -> None:
        self.client.xack(self.ledger.stream, GROUP, entry_id)
