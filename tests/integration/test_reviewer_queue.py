"""The review queue against the real Redis and Kafka servers of the local stack.

Review requests go in through the real review-requests topic, labels come back out of the real feedback topic.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.common.audit import AuditLog
from services.common.banks import HashBankStore, UploadSignals
from services.common.config import Settings
from services.common.errors import TransientError
from services.common.kafka_io import AckedProducer, ensure_topics
from services.common.schemas import DuplicateMatch, FeedbackLabel, ReviewReason, ReviewRequest
from services.reviewer.app import build_services, create_app
from services.reviewer.labels import FeedbackPublisher, LabelBody, Labeller, NotClaimed
from services.reviewer.queue import Claim, QueueKeys, ReviewIngestor, ReviewQueue
from services.reviewer.settings import ReviewerSettings

REVIEWER = "reviewer-token-0123456789"
ADMIN = "admin-token-0123456789ab"


def _request(n: int, priority: float) -> ReviewRequest:
    return ReviewRequest(
        upload_id=f"up-{n:03d}",
        image_uri=f"file:///photos/up-{n:03d}.jpg",
        reason=ReviewReason.NEAR_THRESHOLD_DUPLICATE,
        priority=priority,
        scores={"nsfw": 0.45, "spam": 0.1},
        neighbours=[DuplicateMatch(upload_id=f"nb-{n:03d}", score=0.905), DuplicateMatch(upload_id="nb-x", score=0.6)],
        model_version="sieve_embedder:1",
    )


def _wait(predicate: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _publish(settings: Settings, requests: list[ReviewRequest]) -> None:
    producer = AckedProducer(settings.kafka)
    for r in requests:
        producer.produce(settings.kafka.topic_review, r.upload_id, r.model_dump_json().encode())
    producer.flush(30)


def _read_feedback(settings: Settings, quiet_s: float, timeout_s: float = 60.0, expect: int = 1) -> list[Any]:
    """Every message on the feedback topic: reads until ``expect`` arrived, then ``quiet_s`` more for extras."""
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"feedback-reader-{time.monotonic_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.kafka.topic_feedback])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    quiet_until: float | None = None
    try:
        while time.monotonic() < (quiet_until or deadline):
            msg = consumer.poll(0.3)
            if msg is None or msg.error():
                continue
            out.append(msg)
            if len(out) >= expect and quiet_until is None:
                quiet_until = time.monotonic() + quiet_s
    finally:
        consumer.close()
    return out


def _committed(settings: Settings, group: str) -> int:
    """Sum of the group's committed offsets on the review topic (0 when nothing was committed)."""
    consumer = Consumer({**settings.kafka.client_config(), "group.id": group, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(settings.kafka.topic_review, p) for p in range(settings.kafka.partitions)]
        return sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=10))
    finally:
        consumer.close()


@pytest.fixture()
def client(settings: Settings) -> Iterator[redis.Redis]:
    ensure_topics(settings.kafka)
    c = redis.Redis.from_url(settings.redis.url.get_secret_value())
    yield c
    c.close()


def _queue(client: redis.Redis, settings: Settings, ttl_s: int = 30) -> ReviewQueue:
    return ReviewQueue(client, settings.redis.key_prefix, ttl_s)


class _CountingQueue(ReviewQueue):
    """The real queue, counting write attempts so a test can wait for a retry instead of sleeping."""

    attempts = 0

    def ingest(self, requests: Sequence[ReviewRequest]) -> int:
        self.attempts += 1
        return super().ingest(requests)


def test_requests_from_the_topic_are_queued_once_in_priority_order(client: redis.Redis, settings: Settings) -> None:
    queue = _queue(client, settings)
    group = f"reviewer-{settings.redis.key_prefix}"
    ingestor = ReviewIngestor(settings.kafka, queue, group)
    ingestor.start()
    try:
        priorities = [0.2, 0.9, 0.5, 0.7, 0.1]
        requests = [_request(i, p) for i, p in enumerate(priorities)]
        _publish(settings, requests)
        _publish(settings, [requests[1], requests[3]])  # the moderator redelivers two of them
        _wait(lambda: _committed(settings, group) == 7, what="all 7 messages committed")
        assert queue.stats().pending == 5
    finally:
        ingestor.stop()
    claimed = [queue.claim(f"r{i}") for i in range(6)]
    assert [c.request.priority for c in claimed if c] == sorted(priorities, reverse=True)
    assert claimed[-1] is None
    assert queue.stats().claimed == 5


def test_ingestion_commits_only_after_the_redis_write(client: redis.Redis, settings: Settings) -> None:
    with socket.socket() as s:  # a port where no Redis listens: every write fails for real
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dead = redis.Redis(host="127.0.0.1", port=dead_port, socket_connect_timeout=0.2, socket_timeout=0.2)
    group = f"reviewer-{settings.redis.key_prefix}"
    dead_queue = _CountingQueue(dead, settings.redis.key_prefix, 30)
    broken = ReviewIngestor(settings.kafka, dead_queue, group)
    broken.start()
    _publish(settings, [_request(1, 0.5), _request(2, 0.6)])
    _wait(lambda: broken.last_error is not None and "redis" in broken.last_error, what="the failed Redis write")
    # A second failed attempt means the ingestor went round its retry loop: had it committed, it would be now.
    _wait(lambda: dead_queue.attempts >= 2, what="a retry of the failed write")
    assert _committed(settings, group) == 0
    broken.stop()
    assert _committed(settings, group) == 0  # nothing was lost: the next owner reads both again

    queue = _queue(client, settings)
    healthy = ReviewIngestor(settings.kafka, queue, group)
    healthy.start()
    try:
        _wait(lambda: queue.stats().pending == 2, what="both requests queued after Redis came back")
        _wait(lambda: _committed(settings, group) == 2, what="the commit after the write")
    finally:
        healthy.stop()


def test_concurrent_claimers_never_get_the_same_item(client: redis.Redis, settings: Settings) -> None:
    # Two replicas of the service, each with its own connection, and 24 reviewers racing for 10 items.
    other = redis.Redis.from_url(settings.redis.url.get_secret_value())
    replicas = [_queue(client, settings), _queue(other, settings)]
    replicas[0].ingest([_request(i, (i % 3) / 3) for i in range(10)])
    barrier = threading.Barrier(24)
    results: list[str | None] = [None] * 24

    def claim(i: int) -> None:
        barrier.wait()
        got = replicas[i % 2].claim(f"reviewer-{i}")
        results[i] = got.request.upload_id if got else None

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    won = [r for r in results if r is not None]
    assert len(won) == 10 and len(set(won)) == 10
    assert replicas[1].stats().pending == 0 and replicas[1].stats().claimed == 10
    other.close()


def test_an_expired_claim_goes_back_to_the_queue(client: redis.Redis, settings: Settings) -> None:
    queue = _queue(client, settings, ttl_s=1)
    publisher = FeedbackPublisher(settings.kafka)
    labeller = Labeller(
        client, settings.redis.key_prefix, publisher, AuditLog(client, settings.redis.key_prefix), ["safe", "nsfw"]
    )
    queue.ingest([_request(1, 0.5)])
    first = queue.claim("alice")
    assert first is not None and first.new
    assert queue.claim("bob") is None  # held by alice
    again = queue.claim("alice")  # alice's own live claim is returned (and extended), not a second item
    assert again is not None and not again.new and again.request.upload_id == first.request.upload_id
    claims: list[Claim | None] = []

    def bob_claims() -> bool:
        claims.append(queue.claim("bob"))
        return claims[-1] is not None

    _wait(bob_claims, 10, "the claim to expire")
    taken = claims[-1]
    assert taken is not None and taken.request.upload_id == "up-001"
    with pytest.raises(NotClaimed):
        labeller.label("alice", first.request, LabelBody(not_duplicate=True))
    item = queue.item("up-001")
    assert item is not None and item.state == "claimed" and item.claimed_by == "bob"


def test_a_skipped_item_goes_to_someone_else(client: redis.Redis, settings: Settings) -> None:
    queue = _queue(client, settings)
    queue.ingest([_request(1, 0.9)])
    claim = queue.claim("alice")
    assert claim is not None
    assert not queue.release("up-001", "bob")  # only the holder can give it back
    assert queue.release("up-001", "alice")
    assert queue.claim("alice") is None  # alice skipped it
    bob = queue.claim("bob")
    assert bob is not None and bob.request.upload_id == "up-001"


def test_labels_reach_the_feedback_topic_once_per_reviewer(client: redis.Redis, settings: Settings) -> None:
    rsettings = ReviewerSettings(
        reviewer_tokens=[SecretStr(f"alice:{REVIEWER}")],
        admin_tokens=[SecretStr(f"root:{ADMIN}")],
        consumer_group=f"reviewer-{settings.redis.key_prefix}",
    )
    services = build_services(settings, rsettings)
    h = {"Authorization": f"Bearer {REVIEWER}"}
    with TestClient(create_app(rsettings, services)) as api:
        _publish(settings, [_request(7, 0.8)])
        _wait(lambda: api.get("/api/queue/stats", headers=h).json()["pending"] == 1, what="the request ingested")
        item = api.post("/api/claim", headers=h).json()["item"]
        assert item["upload_id"] == "up-007" and item["claimed_by"] == "alice"
        assert api.get("/api/queue/stats", headers=h).json() == {"pending": 0, "claimed": 1, "labelled": 0}

        first = api.post("/api/items/up-007/label", headers=h, json={"duplicate_of": "nb-007"})
        assert first.status_code == 201, first.text
        # The same reviewer again (a double click, a retry, even a change of mind): the first label stands.
        for body in ({"duplicate_of": "nb-007"}, {"not_duplicate": True}):
            again = api.post("/api/items/up-007/label", headers=h, json=body)
            assert again.status_code == 200 and again.json()["repeated"] is True
            assert again.json()["label"] == first.json()["label"]
        assert api.get("/api/queue/stats", headers=h).json() == {"pending": 0, "claimed": 0, "labelled": 1}
        assert api.get("/api/items/up-007", headers=h).json()["state"] == "labelled"
        assert api.post("/api/claim", headers=h).json() == {"item": None}

        # A redelivered request for an item already labelled is not queued again.
        _publish(settings, [_request(7, 0.8)])
        # The ingestor commits after handling a message, so a second commit means the redelivery was handled.
        _wait(lambda: _committed(settings, rsettings.consumer_group) == 2, what="the redelivered request handled")
        assert api.get("/api/queue/stats", headers=h).json()["pending"] == 0

        audit = api.get("/api/admin/audit", headers={"Authorization": f"Bearer {ADMIN}"}).json()["entries"]
        labels = [e for e in audit if e["event"] == "label"]
        assert len(labels) == 1 and labels[0]["actor"] == "alice" and labels[0]["subject"] == "up-007"

    messages = _read_feedback(settings, quiet_s=3.0)
    assert len(messages) == 1
    assert messages[0].key() == b"up-007"
    label = FeedbackLabel.model_validate_json(messages[0].value())
    assert (label.upload_id, label.reviewer_id, label.duplicate_of) == ("up-007", "alice", "nb-007")
    assert label.model_dump(mode="json") == first.json()["label"]


class _FailOncePublisher(FeedbackPublisher):
    """The real publisher, except that its first publish fails as a broker outage would."""

    failed = False

    def publish(self, label_json: str, upload_id: str) -> None:
        if not self.failed:
            self.failed = True
            raise TransientError("kafka", "1 unacknowledged")
        super().publish(label_json, upload_id)


def test_a_retry_after_a_failed_publish_sends_the_reserved_label(client: redis.Redis, settings: Settings) -> None:
    queue = _queue(client, settings)
    publisher = _FailOncePublisher(settings.kafka)
    labeller = Labeller(
        client, settings.redis.key_prefix, publisher, AuditLog(client, settings.redis.key_prefix), ["safe", "nsfw"]
    )
    queue.ingest([_request(3, 0.5)])
    claim = queue.claim("alice")
    assert claim is not None
    with pytest.raises(TransientError):
        labeller.label("alice", claim.request, LabelBody(categories={"nsfw": True, "safe": False}))
    assert queue.stats().claimed == 1  # still alice's: nothing was completed
    retried = labeller.label("alice", claim.request, LabelBody(categories={"safe": True}))
    assert retried.label.categories == {"nsfw": True, "safe": False}  # the reserved decision, not the new body
    assert labeller.label("alice", claim.request, LabelBody(not_duplicate=True)).repeated
    messages = _read_feedback(settings, quiet_s=3.0)
    assert len(messages) == 1
    assert FeedbackLabel.model_validate_json(messages[0].value()) == retried.label
    assert queue.stats() == type(queue.stats())(pending=0, claimed=0, labelled=1)


def test_admin_settings_land_in_redis_for_the_moderator(client: redis.Redis, settings: Settings) -> None:
    rsettings = ReviewerSettings(admin_tokens=[SecretStr(f"root:{ADMIN}")])
    services = build_services(settings, rsettings)
    services.ingestor = None  # this test needs no consumer
    h = {"Authorization": f"Bearer {ADMIN}"}
    prefix = settings.redis.key_prefix
    with TestClient(create_app(rsettings, services)) as api:
        res = api.put("/api/admin/thresholds", headers=h, json={"duplicate_threshold": 0.93, "flag_review_low": 0.5})
        assert res.status_code == 200, res.text
        assert json.loads(cast(bytes, client.get(f"{prefix}:config:thresholds"))) == {
            "duplicate_threshold": 0.93,
            "flag_review_low": 0.5,
        }
        assert res.json()["effective"]["flag_threshold"] == settings.decision.flag_threshold
        # A low band edge above the flag threshold would make the moderator's band empty: refused, not stored.
        assert api.put("/api/admin/thresholds", headers=h, json={"flag_review_low": 0.95}).status_code == 422
        assert api.get("/api/admin/thresholds", headers=h).json()["overrides"]["flag_review_low"] == 0.5

        # Banks live in the same store the moderator matches against.
        assert api.put("/api/admin/banks/known-bad", headers=h, json={"description": "seed"}).status_code == 201
        hashes = {"hashes": [{"kind": "sha256", "value": "b" * 64}]}
        assert api.post("/api/admin/banks/known-bad/hashes", headers=h, json=hashes).status_code == 200
        store = HashBankStore(client, prefix)
        assert [m.bank for m in store.match(UploadSignals(sha256="b" * 64))] == ["known-bad"]
        assert api.put("/api/admin/banks/known-bad", headers=h, json={"enabled": False}).status_code == 200
        assert [m.bank for m in store.match(UploadSignals(sha256="b" * 64))] == []
        assert api.delete("/api/admin/banks/known-bad", headers=h).status_code == 204
        assert store.all_banks() == []

        assert api.post("/api/admin/promote", headers=h, json={"version": "4"}).status_code == 202
        entries = client.xrange(f"{prefix}:trainer:promotion-requests") or []
        assert len(entries) == 1 and (entries[0][1] or {})[b"version"] == b"4"

        events = [e["event"] for e in api.get("/api/admin/audit", headers=h).json()["entries"]]
        assert events == [
            "promotion_requested",
            "bank_deleted",
            "bank_updated",
            "bank_signals_added",  # the /hashes route is the signals operation, restricted to hash kinds
            "bank_created",
            "thresholds",
        ]
    assert client.xlen(QueueKeys(prefix).audit) == 6
