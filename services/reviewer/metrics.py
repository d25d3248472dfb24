"""The reviewer's OpenTelemetry instruments; names match the dashboard (sieve_review_queue_depth, sieve_labels)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from services.common.telemetry import meter

log = logging.getLogger(__name__)


class ReviewerMetrics:
    def __init__(self, depth: Callable[[], tuple[int, int]], m: Meter | None = None) -> None:
        """``depth`` returns (pending, claimed); it is called at each metrics collection."""
        m = m or meter("sieve.reviewer")
        self._depth = depth
        self.labels = m.create_counter("sieve_labels", description="labels published, by kind and role")
        self.claims = m.create_counter("sieve_review_claims", description="items claimed by reviewers")
        self.ingested = m.create_counter("sieve_review_ingested", description="new review requests queued")
        m.create_observable_gauge(
            "sieve_review_queue_depth", callbacks=[self._observe_depth], description="review items by state"
        )

    def _observe_depth(self, _options: CallbackOptions) -> Iterable[Observation]:
        try:
            pending, claimed = self._depth()
        except Exception as exc:  # a scrape must never fail because Redis is briefly away
            log.debug("queue depth unavailable: %s", exc)
            return []
        return [Observation(pending, {"state": "pending"}), Observation(claimed, {"state": "claimed"})]
