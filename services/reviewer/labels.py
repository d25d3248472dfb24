"""Labels: validated against the item, published to the feedback topic, recorded once, audited.

Idempotence per (upload_id, reviewer): the first label a reviewer gives an item is reserved in Redis before it
is published, and a repeat returns that same label without publishing again. If the publish (or this process)
fails after the reservation, the repeat publishes the *stored* label, byte for byte, so the feedback topic can
only ever carry identical copies of one reviewer's decision, never two different ones.

The audit log is a Redis stream (``{<prefix>:review}:audit``), written in the same script that completes a
label, plus an optional append-only JSON-lines file.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import redis
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field

from services.common.audit import AuditLog
from services.common.config import KafkaSettings
from services.common.kafka_io import AckedProducer
from services.common.redis_text import text
from services.common.schemas import FeedbackLabel, ReviewRequest, utcnow
from services.common.telemetry import inject_headers, tracer
from services.reviewer.queue import QueueKeys

log = logging.getLogger(__name__)
_tracer = tracer("sieve.reviewer")

PENDING, DONE = "pending|", "done|"

# KEYS: labels owner claims ; ARGV: upload_id reviewer label_json ttl_s
_RESERVE = """
local existing = redis.call('HGET', KEYS[1], ARGV[2])
if existing then return {'existing', existing} end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return {'not_claimed', ''} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not expires or tonumber(expires) <= now then return {'not_claimed', ''} end
redis.call('HSET', KEYS[1], ARGV[2], 'pending|' .. ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return {'reserved', ''}
"""

# KEYS: labels requests priority pending claims owner held done labelled_count audit
# ARGV: upload_id reviewer label_json ttl_s audit_detail
_FINISH = """
local v = redis.call('HGET', KEYS[1], ARGV[2])
if v and string.sub(v, 1, 5) == 'done|' then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], 'done|' .. ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
local req = redis.call('HGET', KEYS[2], ARGV[1])
if req then redis.call('SET', KEYS[8], req, 'EX', tonumber(ARGV[4])) end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
local who = redis.call('HGET', KEYS[6], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
if who and redis.call('HGET', KEYS[7], who) == ARGV[1] then redis.call('HDEL', KEYS[7], who) end
redis.call('INCR', KEYS[9])
redis.call('XADD', KEYS[10], '*', 'event', 'label', 'actor', ARGV[2], 'subject', ARGV[1], 'detail', ARGV[5])
return 1
"""


class InvalidLabel(ValueError):
    """The label does not fit the item (unknown category, a duplicate_of that is not a neighbour, ...)."""


class NotClaimed(Exception):
    """The reviewer does not hold a live claim on the item: someone else has it, or the claim expired."""


class LabelBody(BaseModel):
    """What the page sends: one of duplicate_of / not_duplicate, and/or category flags."""

    model_config = ConfigDict(extra="forbid")

    duplicate_of: str | None = Field(default=None, max_length=200)
    not_duplicate: bool = False
    categories: dict[str, bool] = Field(default_factory=dict)


def compared_neighbour(body: LabelBody, request: ReviewRequest) -> str | None:
    """The neighbour a duplicate decision is about: the one named, or for "not a duplicate" the top match."""
    if body.duplicate_of is not None:
        return body.duplicate_of
    if body.not_duplicate and request.neighbours:
        return max(request.neighbours, key=lambda n: n.score).upload_id
    return None


def build_label(
    body: LabelBody,
    request: ReviewRequest,
    reviewer_id: str,
    categories: Sequence[str],
    compared_uri: str | None = None,
) -> FeedbackLabel:
    """Checks the body against the item and the configured categories; raises InvalidLabel.

    The label carries both images' URIs and the model version, so the retraining job can turn it into a
    training pair without asking anyone (``compared_uri``: where the compared neighbour's image is).
    """
    if body.duplicate_of is not None and body.not_duplicate:
        raise InvalidLabel("duplicate_of and not_duplicate exclude each other")
    if body.duplicate_of is None and not body.not_duplicate and not body.categories:
        raise InvalidLabel("a label needs duplicate_of, not_duplicate or at least one category")
    if body.duplicate_of is not None and body.duplicate_of not in {n.upload_id for n in request.neighbours}:
        raise InvalidLabel(f"{body.duplicate_of!r} is not one of this item's neighbours")
    if body.not_duplicate and not request.neighbours:
        raise InvalidLabel("not_duplicate needs a neighbour to compare with, and this item has none")
    unknown = sorted(set(body.categories) - set(categories))
    if unknown:
        raise InvalidLabel(f"unknown categories {unknown}; configured: {list(categories)}")
    compared = compared_neighbour(body, request)
    return FeedbackLabel(
        upload_id=request.upload_id,
        reviewer_id=reviewer_id,
        duplicate_of=body.duplicate_of,
        not_duplicate=body.not_duplicate,
        categories=dict(body.categories),
        decided_at=utcnow(),
        model_version=request.model_version,
        image_uri=request.image_uri,
        compared_with=compared,
        compared_uri=compared_uri if compared is not None else None,
    )


def label_kind(label: FeedbackLabel) -> str:
    if label.duplicate_of is not None:
        return "duplicate"
    if label.not_duplicate:
        return "not_duplicate"
    return "category"


@dataclass(frozen=True)
class LabelOutcome:
    label: FeedbackLabel
    repeated: bool  # True: this reviewer had already labelled the item; nothing new was published


class FeedbackPublisher:
    """Publishes FeedbackLabels keyed by upload_id and waits for the broker's acknowledgement."""

    def __init__(self, kafka: KafkaSettings, timeout_s: float = 30.0) -> None:
        self.topic = kafka.topic_feedback
        self.timeout_s = timeout_s
        self.producer = AckedProducer(kafka)
        # AckedProducer's flush accounts for every message in flight; one label at a time keeps errors attributable.
        self._lock = threading.Lock()

    def publish(self, label_json: str, upload_id: str) -> None:
        with self._lock:
            self.producer.produce(self.topic, upload_id, label_json.encode(), inject_headers())
            self.producer.flush(self.timeout_s)


class Labeller:
    """Reserve in Redis, publish to Kafka, then complete in Redis (which also dequeues and audits)."""

    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str,
        publisher: FeedbackPublisher,
        audit: AuditLog,
        categories: Sequence[str],
        record_ttl_s: int = 7 * 24 * 3600,
    ) -> None:
        self.client = client
        self.keys = QueueKeys(key_prefix)
        self.publisher = publisher
        self.audit = audit
        self.categories = list(categories)
        self.record_ttl_s = record_ttl_s
        self._reserve = client.register_script(_RESERVE)
        self._finish = client.register_script(_FINISH)

    def label(self, reviewer_id: str, request: ReviewRequest, body: LabelBody) -> LabelOutcome:
        """Raises InvalidLabel, NotClaimed, or TransientError/RedisError (retry: the same label is kept)."""
        k = self.keys
        compared = compared_neighbour(body, request)
        compared_uri = text(self.client.get(k.upload_uri(compared)) or "") if compared else ""
        label = build_label(body, request, reviewer_id, self.categories, compared_uri or None)
        uid = request.upload_id
        with _tracer.start_as_current_span("reviewer.label") as span:
            span.set_attribute("sieve.upload_id", uid)
            status, stored = self._reserve(
                keys=[k.labels(uid), k.owner, k.claims],
                args=[uid, reviewer_id, label.model_dump_json(), self.record_ttl_s],
            )
            status, stored = text(status), text(stored)
            if status == "not_claimed":
                raise NotClaimed(f"{reviewer_id} holds no live claim on {uid}")
            if status == "existing":
                label_json = stored.split("|", 1)[1]
                previous = FeedbackLabel.model_validate_json(label_json)
                if stored.startswith(DONE):
                    span.set_attribute("sieve.label_repeated", True)
                    return LabelOutcome(previous, repeated=True)
                label = previous  # reserved earlier but not completed: publish exactly what was reserved
            else:
                label_json = label.model_dump_json()
            try:
                self.publisher.publish(label_json, uid)
            except Exception as exc:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                raise
            detail = json.dumps(
                {
                    "label": json.loads(label_json),
                    "reason": request.reason.value,
                    "model_version": request.model_version,
                },
                sort_keys=True,
            )
            first = self._finish(
                keys=[
                    k.labels(uid),
                    k.requests,
                    k.priority,
                    k.pending,
                    k.claims,
                    k.owner,
                    k.held,
                    k.done(uid),
                    k.labelled,
                    k.audit,
                ],
                args=[uid, reviewer_id, label_json, self.record_ttl_s, detail],
            )
            if int(first):
                self.audit.append_file("label", reviewer_id, uid, detail)
            return LabelOutcome(label, repeated=False)
