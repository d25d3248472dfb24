"""The review queue in Redis: prioritised, deduplicated on ingest, with expiring claims taken atomically.

Every state change is one Lua script, so two reviewers (or two replicas of this service) can never claim the
same item, and a redelivered review request can never be queued twice. All keys of one queue share a Redis
Cluster hash tag, so the scripts also run on a cluster.

Keys (``P`` is ``{<redis key prefix>:review}``):

- ``P:requests``  hash   upload_id -> ReviewRequest JSON, for every item not yet labelled
- ``P:priority``  hash   upload_id -> priority (to re-queue an expired claim at its old rank)
- ``P:pending``   zset   upload_id scored by priority; the highest is claimed first
- ``P:claims``    zset   upload_id scored by its claim's expiry (milliseconds, Redis server clock)
- ``P:owner``     hash   upload_id -> reviewer_id holding the claim
- ``P:held``      hash   reviewer_id -> upload_id (one live claim per reviewer)
- ``P:skips:<r>`` set    items reviewer r skipped; kept out of r's claims for a while
- ``P:seen:<id>`` string ingest dedup marker, with a TTL
- ``P:labels:<id>`` hash reviewer_id -> the FeedbackLabel JSON they gave (see labels.py)
- ``P:done:<id>`` string the ReviewRequest of a labelled item, kept for the dedup window
- ``P:audit``     stream the audit log (see labels.py)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from opentelemetry import trace
from pydantic import ValidationError

from services.common.config import KafkaSettings
from services.common.kafka_io import consumer_config
from services.common.redis_text import text
from services.common.schemas import ReviewRequest
from services.common.telemetry import extract_context, tracer
from services.common.upload_keys import upload_uri_key

log = logging.getLogger(__name__)
_tracer = tracer("sieve.reviewer")

ItemState = Literal["pending", "claimed", "labelled"]


@dataclass(frozen=True)
class QueueKeys:
    """Key names of one review queue; the labeller and the admin store derive theirs from the same prefix."""

    prefix: str

    @property
    def base(self) -> str:
        return f"{{{self.prefix}:review}}"

    @property
    def requests(self) -> str:
        return f"{self.base}:requests"

    @property
    def priority(self) -> str:
        return f"{self.base}:priority"

    @property
    def pending(self) -> str:
        return f"{self.base}:pending"

    @property
    def claims(self) -> str:
        return f"{self.base}:claims"

    @property
    def owner(self) -> str:
        return f"{self.base}:owner"

    @property
    def held(self) -> str:
        return f"{self.base}:held"

    @property
    def labelled(self) -> str:
        return f"{self.base}:labelled_count"

    @property
    def audit(self) -> str:
        return f"{self.base}:audit"

    def skips(self, reviewer_id: str) -> str:
        return f"{self.base}:skips:{reviewer_id}"

    def seen(self, upload_id: str) -> str:
        return f"{self.base}:seen:{upload_id}"

    def labels(self, upload_id: str) -> str:
        return f"{self.base}:labels:{upload_id}"

    def done(self, upload_id: str) -> str:
        return f"{self.base}:done:{upload_id}"

    def upload_uri(self, upload_id: str) -> str:
        """Where an upload's image URI is remembered so neighbours can be shown (moderator and reviewer write it)."""
        return upload_uri_key(self.prefix, upload_id)


# Re-queues expired claims; shared by claim, stats and the explicit sweep. Uses the Redis server's clock so that
# replicas with skewed clocks agree on when a claim has expired.
_SWEEP = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function sweep(pending, claims, owner, held, priority, requests, now)
  local expired = redis.call('ZRANGEBYSCORE', claims, '-inf', now)
  for _, id in ipairs(expired) do
    local who = redis.call('HGET', owner, id)
    redis.call('ZREM', claims, id)
    redis.call('HDEL', owner, id)
    if who and redis.call('HGET', held, who) == id then redis.call('HDEL', held, who) end
    local p = redis.call('HGET', priority, id)
    if p and redis.call('HEXISTS', requests, id) == 1 then redis.call('ZADD', pending, p, id) end
  end
  return #expired
end
"""

# KEYS: requests priority pending claims seen ; ARGV: upload_id json priority dedup_ttl_s
_INGEST = """
if not redis.call('SET', KEYS[5], '1', 'NX', 'EX', tonumber(ARGV[4])) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
"""

# KEYS: pending claims owner held priority requests skips ; ARGV: reviewer ttl_ms scan
_CLAIM = (
    _SWEEP
    + """
local now = now_ms()
sweep(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], now)
local expires = now + tonumber(ARGV[2])
local mine = redis.call('HGET', KEYS[4], ARGV[1])
if mine then
  redis.call('ZADD', KEYS[2], expires, mine)
  return {mine, expires, 0}
end
local candidates = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)
for _, id in ipairs(candidates) do
  if redis.call('SISMEMBER', KEYS[7], id) == 0 then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], expires, id)
    redis.call('HSET', KEYS[3], id, ARGV[1])
    redis.call('HSET', KEYS[4], ARGV[1], id)
    return {id, expires, 1}
  end
end
return false
"""
)

# KEYS: pending claims owner held priority requests skips ; ARGV: upload_id reviewer skip_ttl_s
_RELEASE = """
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[2])
local p = redis.call('HGET', KEYS[5], ARGV[1])
if p and redis.call('HEXISTS', KEYS[6], ARGV[1]) == 1 then redis.call('ZADD', KEYS[1], p, ARGV[1]) end
redis.call('SADD', KEYS[7], ARGV[1])
redis.call('EXPIRE', KEYS[7], tonumber(ARGV[3]))
return 1
"""

# KEYS: pending claims owner held priority requests ; ARGV: -
_STATS = (
    _SWEEP
    + """
local now = now_ms()
sweep(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], now)
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), now}
"""
)


@dataclass(frozen=True)
class Claim:
    request: ReviewRequest
    reviewer_id: str
    expires_at_ms: int
    new: bool  # False when the reviewer already held this claim and it was only extended


@dataclass(frozen=True)
class QueueItem:
    request: ReviewRequest
    state: ItemState
    claimed_by: str | None
    claim_expires_at_ms: int | None
    labelled_by: list[str]


@dataclass(frozen=True)
class QueueStats:
    pending: int
    claimed: int
    labelled: int


class ReviewQueue:
    """The queue's operations; every one that changes state is a single atomic script."""

    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str,
        claim_ttl_s: int,
        dedup_ttl_s: int = 7 * 24 * 3600,
        skip_ttl_s: int = 3600,
        uri_ttl_s: int = 7 * 24 * 3600,
    ) -> None:
        self.client = client
        self.keys = QueueKeys(key_prefix)
        self.claim_ttl_ms = claim_ttl_s * 1000
        self.dedup_ttl_s = dedup_ttl_s
        self.skip_ttl_s = skip_ttl_s
        self.uri_ttl_s = uri_ttl_s
        self._ingest = client.register_script(_INGEST)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._stats = client.register_script(_STATS)

    def _state_keys(self) -> list[str]:
        k = self.keys
        return [k.pending, k.claims, k.owner, k.held, k.priority, k.requests]

    def ingest(self, requests: Sequence[ReviewRequest]) -> int:
        """Queues the requests not seen before; returns how many were new. Raises RedisError on failure."""
        if not requests:
            return 0
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        for r in requests:
            self._ingest(
                keys=[k.requests, k.priority, k.pending, k.claims, k.seen(r.upload_id)],
                args=[r.upload_id, r.model_dump_json(), repr(float(r.priority)), self.dedup_ttl_s],
                client=pipe,
            )
            # The item's own image is a neighbour of later items: remember where it lives.
            pipe.set(k.upload_uri(r.upload_id), r.image_uri, ex=self.uri_ttl_s, nx=True)
        results = pipe.execute()
        return sum(int(v) for v in results[0::2])

    def claim(self, reviewer_id: str, scan: int = 100) -> Claim | None:
        """The reviewer's live claim (extended), else the highest-priority item they have not skipped."""
        k = self.keys
        reply = self._claim(
            keys=[*self._state_keys(), k.skips(reviewer_id)], args=[reviewer_id, self.claim_ttl_ms, scan]
        )
        if not reply:
            return None
        upload_id, expires, new = text(reply[0]), int(reply[1]), bool(int(reply[2]))
        request = self.request(upload_id)
        if request is None:  # labelled between the claim and this read by a concurrent label call
            return None
        return Claim(request, reviewer_id, expires, new)

    def release(self, upload_id: str, reviewer_id: str) -> bool:
        """Gives a claim back (a skip): the item returns to the queue, and stays out of this reviewer's claims."""
        k = self.keys
        keys = [*self._state_keys(), k.skips(reviewer_id)]
        return bool(self._release(keys=keys, args=[upload_id, reviewer_id, self.skip_ttl_s]))

    def request(self, upload_id: str) -> ReviewRequest | None:
        raw = self.client.hget(self.keys.requests, upload_id)
        return ReviewRequest.model_validate_json(raw) if raw else None

    def item(self, upload_id: str) -> QueueItem | None:
        """The item and its state; a labelled item stays readable for the dedup window."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(k.requests, upload_id)
        pipe.get(k.done(upload_id))
        pipe.hget(k.owner, upload_id)
        pipe.zscore(k.claims, upload_id)
        pipe.hkeys(k.labels(upload_id))
        raw, done, owner, expires, labellers = pipe.execute()
        labelled_by = sorted(text(r) for r in labellers or [])
        if raw is None:
            if done is None:
                return None
            return QueueItem(ReviewRequest.model_validate_json(done), "labelled", None, None, labelled_by)
        request = ReviewRequest.model_validate_json(raw)
        now_ms = int(time.time() * 1000)
        if owner is not None and expires is not None and int(expires) > now_ms:
            return QueueItem(request, "claimed", text(owner), int(expires), labelled_by)
        return QueueItem(request, "pending", None, None, labelled_by)

    def upload_uris(self, upload_ids: Sequence[str]) -> dict[str, str]:
        """Image URIs of uploads (neighbours), where the moderator or an earlier review request recorded them."""
        if not upload_ids:
            return {}
        values = self.client.mget([self.keys.upload_uri(u) for u in upload_ids])
        return {u: text(v) for u, v in zip(upload_ids, values, strict=True) if v}

    def remember_uri(self, upload_id: str, image_uri: str) -> None:
        self.client.set(self.keys.upload_uri(upload_id), image_uri, ex=self.uri_ttl_s)

    def stats(self) -> QueueStats:
        pending, claimed, _now = self._stats(keys=self._state_keys(), args=[])
        labelled = self.client.get(self.keys.labelled)
        return QueueStats(int(pending), int(claimed), int(labelled or 0))

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False


class ReviewIngestor:
    """Consumes the review-requests topic into the queue; offsets are committed only after the Redis write.

    Runs in a background thread. A Redis outage pauses ingestion (the batch is retried with backoff, nothing is
    committed), so a request is never lost; the ingest script's dedup makes the retry and any redelivery harmless.
    A request that does not parse is logged and skipped: retrying it cannot help.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        queue: ReviewQueue,
        group_id: str,
        on_ingested: Callable[[int], None] | None = None,
        batch_size: int = 200,
    ) -> None:
        self.kafka = kafka
        self.queue = queue
        self.group_id = group_id
        self.on_ingested = on_ingested
        self.batch_size = batch_size
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.assigned = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="review-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        conf = consumer_config(self.kafka, self.group_id)
        consumer = Consumer(conf)
        consumer.subscribe([self.kafka.topic_review], on_assign=lambda _c, _p: self.assigned.set())
        try:
            while not self._stop.is_set():
                messages = consumer.consume(self.batch_size, 0.5)
                batch = [m for m in messages if self._usable(m)]
                if not messages:
                    continue
                if not self._ingest_with_retry(batch):
                    return  # stopping before the write: leave the offsets uncommitted for the next owner
                try:
                    consumer.commit(offsets=_next_offsets(messages), asynchronous=False)
                except KafkaException as exc:
                    # Typically a rebalance took the partition: the new owner re-reads, and ingest dedups.
                    log.warning("review-requests commit failed: %s", exc)
        except Exception as exc:  # the thread must not die silently: readiness reports it
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("review ingestion stopped")
        finally:
            consumer.close()

    @staticmethod
    def _usable(msg: Message) -> bool:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("review-requests consumer error: %s", err)
            return False
        return True

    def _ingest_with_retry(self, messages: list[Message]) -> bool:
        """True once the batch is in Redis; False only when stopping first."""
        requests: list[ReviewRequest] = []
        for msg in messages:
            try:
                requests.append(ReviewRequest.model_validate_json(msg.value() or b""))
            except ValidationError as exc:
                log.error(
                    "skipping an invalid review request at %s[%s]@%s: %s",
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    exc.errors(include_url=False, include_input=False)[:3],
                )
        backoff = 0.5
        while not self._stop.is_set():
            parent = extract_context(messages[0].headers()) if messages else None
            with _tracer.start_as_current_span("reviewer.ingest", context=parent) as span:
                span.set_attribute("sieve.batch_size", len(requests))
                try:
                    added = self.queue.ingest(requests)
                except redis.RedisError as exc:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                    self.last_error = f"redis: {exc}"
                    log.warning("review queue write failed, retrying in %.1fs: %s", backoff, exc)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 15.0)
                    continue
            self.last_error = None
            if self.on_ingested is not None:
                self.on_ingested(added)
            return True
        return False


def _next_offsets(messages: Sequence[Message]) -> list[TopicPartition]:
    """The offset after the last message of each partition in the batch (what a commit records)."""
    highest: dict[tuple[str, int], int] = defaultdict(lambda: -1)
    for m in messages:
        if m.error() is None:
            key = (m.topic() or "", m.partition() or 0)
            highest[key] = max(highest[key], m.offset() or 0)
    return [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]
