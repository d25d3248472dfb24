"""The reviewer's metric names and labels, read back through an in-memory OpenTelemetry reader."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.reviewer.metrics import ReviewerMetrics


def _points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], float]]]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, list[tuple[dict[str, Any], float]]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = [(dict(p.attributes or {}), p.value) for p in metric.data.data_points]  # type: ignore[union-attr]
    return out


def test_queue_depth_gauge_and_label_counter() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = ReviewerMetrics(lambda: (7, 2), provider.get_meter("test"))
    metrics.labels.add(1, {"kind": "duplicate", "role": "reviewer"})
    metrics.labels.add(1, {"kind": "duplicate", "role": "reviewer"})
    points = _points(reader)
    assert sorted(points["sieve_review_queue_depth"], key=lambda p: p[1]) == [
        ({"state": "claimed"}, 2),
        ({"state": "pending"}, 7),
    ]
    assert points["sieve_labels"] == [({"kind": "duplicate", "role": "reviewer"}, 2)]


def test_a_redis_outage_does_not_break_a_scrape() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    def down() -> tuple[int, int]:
        raise ConnectionError("redis away")

    metrics = ReviewerMetrics(down, provider.get_meter("test"))
    metrics.claims.add(1)
    points = _points(reader)
    assert "sieve_review_queue_depth" not in points or points["sieve_review_queue_depth"] == []
    assert points["sieve_review_claims"] == [({}, 1)]
