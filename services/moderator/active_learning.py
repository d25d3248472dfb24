"""Active learning: which uncertain items go to reviewers, in what order, and how many.

Expected value of a label = uncertainty (the decision's priority) x reach (audience, logarithmic). A burst of
near-identical uploads is covered by one review (diversity), and a budget shared by all replicas through Redis
caps the requests per minute. Items that are not sent keep a verdict that says why.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import redis

from services.common.config import ReviewSelectionSettings
from services.common.schemas import DuplicateMatch

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    upload_id: str
    uncertainty: float  # 0..1 from the decision
    neighbours: list[DuplicateMatch]
    metadata: dict[str, Any]
    priority: float = 0.0
    selected: bool = False
    skipped_because: str = ""


class ReviewSelector:
    def __init__(self, client: redis.Redis, prefix: str, settings: ReviewSelectionSettings) -> None:
        self.client = client
        self.prefix = prefix
        self.settings = settings

    def reach_factor(self, metadata: dict[str, Any]) -> float:
        raw = metadata.get(self.settings.reach_metadata_key, 0)
        try:
            reach = max(float(raw), 0.0)
        except (TypeError, ValueError):
            reach = 0.0
        return 1.0 + math.log10(1.0 + reach)

    def select(self, candidates: list[Candidate], now: float | None = None) -> list[Candidate]:
        """Marks each candidate selected or skipped (with the reason); returns them highest priority first."""
        for c in candidates:
            c.priority = round(c.uncertainty * self.reach_factor(c.metadata), 4)
        ordered = sorted(candidates, key=lambda c: c.priority, reverse=True)
        queued_here: set[str] = set()
        for c in ordered:
            twin = self._covering_twin(c, queued_here)
            if twin:
                c.skipped_because = f"review_covered_by:{twin}"
                continue
            if not self._take_budget(now):
                c.skipped_because = "review_budget_exhausted"
                continue
            c.selected = True
            queued_here.add(c.upload_id)
        self._remember([c.upload_id for c in ordered if c.selected])
        return ordered

    def _covering_twin(self, c: Candidate, queued_here: set[str]) -> str | None:
        close = [n.upload_id for n in c.neighbours if n.score >= self.settings.diversity_similarity]
        for upload_id in close:
            if upload_id in queued_here:
                return upload_id
        if not close:
            return None
        try:
            flags = self.client.mget([f"{self.prefix}:review:queued:{u}" for u in close])
        except redis.RedisError:
            return None
        return next((u for u, f in zip(close, flags, strict=True) if f), None)

    def _take_budget(self, now: float | None) -> bool:
        minute = int((now if now is not None else time.time()) // 60)
        key = f"{self.prefix}:review:budget:{minute}"
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, 120)
            used, _ = pipe.execute()
        except redis.RedisError:
            return True  # without Redis, reviewing too much beats reviewing nothing
        return int(used) <= self.settings.budget_per_minute

    def _remember(self, upload_ids: list[str]) -> None:
        if not upload_ids:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for u in upload_ids:
                pipe.set(f"{self.prefix}:review:queued:{u}", 1, ex=self.settings.queued_ttl_s)
            pipe.execute()
        except redis.RedisError:
            log.warning("could not record queued reviews; diversity checks may repeat some")
