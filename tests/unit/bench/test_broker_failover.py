"""bench.broker_failover's measures: what counts as "resumed", and what counts as lost or conflicting."""

from __future__ import annotations

from bench.broker_failover import Traffic
from services.common.config import Settings


def _traffic() -> Traffic:
    t = Traffic(Settings(), [], 4.0)
    # upload -> (produced at, uploads partition); verdicts as (read at, verdicts partition, body)
    t.produced = {"a": (9.0, 0), "b": (10.5, 1), "c": (11.0, 0), "d": (12.0, 0)}
    verdict = {"event_id": "e", "action": "allow", "duplicate_of": []}
    t.verdicts = [
        (10.2, 0, {**verdict, "upload_id": "a"}),  # produced before the fault at 10.0: not a sign of resuming
        (11.0, 1, {**verdict, "upload_id": "b"}),
        (14.5, 0, {**verdict, "upload_id": "c"}),
        (14.9, 2, {**verdict, "upload_id": "d"}),
    ]
    return t


def test_resumed_counts_only_uploads_produced_after_the_fault() -> None:
    t = _traffic()
    assert t.first_verdict_after(10.0) == 1.0
    assert t.first_verdict_after(10.0, verdict_partitions={0, 2}) == 4.5
    assert t.first_verdict_from_uploads(10.0, {0}) == 4.5  # b went to partition 1, which the dead leader did not lead
    assert t.first_verdict_after(13.0, produced_after=10.0) == 1.5  # the single broker: from its return
    assert t.first_verdict_after(20.0) is None


def test_latency_is_the_median_from_produce_to_read() -> None:
    assert _traffic().latency_s() == 2.05  # of 1.2, 0.5, 3.5, 2.9


def test_a_second_different_verdict_is_a_conflict_and_a_missing_one_is_lost() -> None:
    t = _traffic()
    t.produced["e"] = (13.0, 1)
    t.verdicts.append((15.0, 0, {"event_id": "e", "action": "block", "duplicate_of": [], "upload_id": "a"}))
    audit = t.audit(settle_s=0.1)
    assert audit["lost"] == 1 and audit["conflicting"] == 1
