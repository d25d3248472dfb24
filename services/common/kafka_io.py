"""Kafka plumbing shared by the services: topic creation, an acknowledged producer, consumer settings."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from services.common.config import KafkaSettings
from services.common.errors import TransientError

# librdkafka's own log lines go through Python logging (JSON, with trace ids) instead of raw stderr.
RDKAFKA_LOG = logging.getLogger("rdkafka")


def replication_for(brokers: int) -> tuple[int, int]:
    """Replication factor and min.insync.replicas for topics on a cluster of this many brokers.

    Three copies, two of which must acknowledge (producers use acks=all), once there are three brokers: a
    write survives losing any one broker, and losing one never stops writes. A smaller cluster gets what fits.
    """
    factor = max(1, min(brokers, 3))
    return factor, 2 if factor >= 3 else 1


def ensure_topics(settings: KafkaSettings, timeout_s: float = 30.0) -> None:
    conf: dict[str, Any] = {**settings.client_config(), "logger": RDKAFKA_LOG}
    admin = AdminClient(conf)
    meta = admin.list_topics(timeout=timeout_s)
    existing = set(meta.topics)
    factor, min_isr = replication_for(len(meta.brokers))
    durable = {"min.insync.replicas": str(min_isr)}
    compacted = {**durable, "cleanup.policy": "compact,delete"}
    wanted = [
        (settings.topic_uploads, settings.partitions, durable),
        (settings.topic_verdicts, settings.partitions, compacted),
        (settings.topic_review, settings.partitions, compacted),
        (settings.topic_feedback, settings.partitions, durable),
        (settings.topic_dlq, 1, durable),
    ]
    new = [
        NewTopic(name, num_partitions=n, replication_factor=factor, config=cfg)
        for name, n, cfg in wanted
        if name not in existing
    ]
    if not new:
        return
    for topic, future in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"cannot create topic {topic}: {exc}") from exc
    _wait_visible(admin, [t.topic for t in new], timeout_s)


def _wait_visible(admin: AdminClient, topics: list[str], timeout_s: float) -> None:
    """On a cluster the broker answering next may not know a topic created a moment ago: wait until it does,
    with a leader for every partition, so that callers can produce and describe at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        meta = admin.list_topics(timeout=timeout_s)
        known = {t: meta.topics[t] for t in topics if t in meta.topics and not meta.topics[t].error}
        led = [all(p.leader >= 0 for p in known[t].partitions.values()) for t in known]
        if (len(known) == len(topics) and all(led)) or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def consumer_config(settings: KafkaSettings, group_id: str | None = None) -> dict[str, Any]:
    """Manual commits only for finished work; cooperative-sticky so a rebalance moves few partitions."""
    return {
        **settings.client_config(),
        "group.id": group_id or settings.consumer_group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        # A replica that dies is replaced within 10 s; the session outlives a broker failover (2.5 s to fence
        # the dead broker plus a coordinator move), so a failover alone does not cost a rebalance.
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
        "max.poll.interval.ms": 600000,
        # After a leader moves, fetching resumes 100 ms after the error instead of 500 ms; an idle partition is
        # answered within 100 ms (uploads arrive one by one, and each waits for this at most).
        "fetch.error.backoff.ms": 100,
        "fetch.wait.max.ms": 100,
        "fetch.max.bytes": 16 * 1024 * 1024,
        # Bounds the prefetch buffer: a slow Triton backs up into Kafka, not into this process's memory.
        "queued.max.messages.kbytes": 8192,
        "logger": RDKAFKA_LOG,
    }


@dataclass
class _Acks:
    pending: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class AckedProducer:
    """An idempotent producer whose flush() fails loudly if any message of the batch was not acknowledged."""

    def __init__(self, settings: KafkaSettings, extra: dict[str, object] | None = None) -> None:
        conf: dict[str, object] = {
            **settings.client_config(),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.timeout.ms": 120000,
            "logger": RDKAFKA_LOG,
        }
        conf.update(extra or {})
        self.config = conf
        self.producer = Producer(conf)
        self._acks = _Acks()

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        with self._acks.lock:
            self._acks.pending -= 1
            if err is not None:
                self._acks.errors.append(str(err))

    def produce(self, topic: str, key: str | None, value: bytes, headers: Iterable[tuple[str, bytes]] = ()) -> None:
        with self._acks.lock:
            self._acks.pending += 1
        while True:
            try:
                self.producer.produce(topic, key=key, value=value, headers=list(headers), on_delivery=self._on_delivery)
                return
            except BufferError:
                self.producer.poll(0.1)

    def flush(self, timeout_s: float = 60.0) -> None:
        remaining = self.producer.flush(timeout_s)
        with self._acks.lock:
            errors, self._acks.errors = self._acks.errors, []
            pending = self._acks.pending
        if remaining or errors or pending:
            raise TransientError("kafka", f"{remaining} unsent, {pending} unacknowledged, errors: {errors[:3]}")

    def poll(self, timeout_s: float = 0.0) -> None:
        self.producer.poll(timeout_s)
