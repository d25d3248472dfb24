"""The consumer-group loop: batch, process, publish, then commit. Pauses while a dependency is down."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from opentelemetry import trace

from services.common.config import Settings
from services.common.errors import TransientError
from services.common.fetch import FetcherRegistry
from services.common.health import HealthServer
from services.common.inference import ImageModels, TritonModels
from services.common.kafka_io import AckedProducer, consumer_config, ensure_topics
from services.common.redis_client import connect
from services.common.telemetry import inject_headers, tracer
from services.moderator.metrics import ModeratorMetrics
from services.moderator.pipeline import BatchOutput, Item, Pipeline

log = logging.getLogger(__name__)
_tracer = tracer("sieve.moderator")


@dataclass
class _Batch:
    """A batch read ahead: its items are being prepared while the previous batch finishes."""

    messages: list[Message]
    items: list[Item]
    prepared: Future[None]
    began: float


class Moderator:
    def __init__(
        self,
        settings: Settings,
        models: ImageModels | None = None,
        fetcher: FetcherRegistry | None = None,
        on_batch: Callable[[BatchOutput], None] | None = None,
    ) -> None:
        self.settings = settings
        self.redis = connect(settings.redis)
        self.metrics = ModeratorMetrics()
        self.models = models or TritonModels(settings.triton, max_batch=64)
        self.pipeline = Pipeline(settings, self.models, self.redis, fetcher, self.metrics)
        self.metrics.index_ages(
            lambda: {
                v: round(time.time() - i.last_sync, 1) for v, i in list(self.pipeline.indexes.items()) if i.last_sync
            }
        )
        self.producer = AckedProducer(settings.kafka)
        self.stop_event = threading.Event()
        self.on_batch = on_batch
        self.consumer: Consumer | None = None
        self.assigned: set[tuple[str, int]] = set()
        self.dependency_down: str | None = None
        self.last_loop = time.monotonic()
        self.processed_count = 0
        self._last_maintenance = time.monotonic()
        self._last_lag = 0.0
        self._pending: _Batch | None = None
        self._prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="prepare")

    # -- rebalance callbacks ------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        log.info("assigned %s", sorted(p.partition for p in partitions))
        if self.dependency_down:
            consumer.pause(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Commit on revoke: the batch read ahead is finished and committed before the partitions go; anything
        # older was committed when its batch finished.
        self._finish_pending(consumer, in_rebalance=True)
        self.assigned -= {(p.topic, p.partition) for p in partitions}
        log.info("revoked %s", sorted(p.partition for p in partitions))

    # -- main loop ----------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            log.info("signal %s: draining in-flight work, then committing", signum)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self, idle_exit_s: float | None = None) -> None:
        cfg = self.settings
        ensure_topics(cfg.kafka)
        self.pipeline.workers.start()
        try:
            self.pipeline.banks.sync(force=True)  # the banks' PDQ index, before the first upload waits on it
        except redis.RedisError:
            log.warning("hash banks not loaded yet (Redis unavailable); the first match will load them")
        health = None
        if cfg.moderator.health_port:
            health = HealthServer(cfg.moderator.health_port, self._live, self._ready)
            health.start()
        consumer = Consumer(consumer_config(cfg.kafka))
        self.consumer = consumer
        consumer.subscribe(
            [cfg.kafka.topic_uploads], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )
        idle_since = time.monotonic()
        try:
            while not self.stop_event.is_set():
                self.last_loop = time.monotonic()
                # With a batch in hand, take only what is already fetched: the batch must not wait for more.
                timeout = 0.0 if self._pending else cfg.moderator.batch_timeout_ms / 1000.0
                messages = consumer.consume(num_messages=cfg.moderator.batch_size, timeout=timeout)
                good = [m for m in messages if self._usable(m)]
                self._maintenance(consumer)  # rate-limited inside; runs under load too
                ahead = self._read_ahead(good) if good else None
                self._finish_pending(consumer)
                self._pending = ahead
                if ahead is None:
                    if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        break
                    continue
                idle_since = time.monotonic()
        finally:
            try:
                self._finish_pending(consumer)
            finally:
                consumer.close()  # leaves the group: partitions are handed over at once, not after a timeout
                self._prepare_pool.shutdown(wait=True)
                self.pipeline.close()
            if health:
                health.stop()

    def _usable(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error: %s", err)
        return False

    def _read_ahead(self, messages: list[Message]) -> _Batch:
        """Starts parsing, fetching, decoding and embedding a batch in the background, while the last one is
        decided: Triton works on this batch while this process verifies the last one's candidates."""
        items = self.pipeline.start_items(messages)
        return _Batch(messages, items, self._prepare_pool.submit(self._prepare_ahead, items), time.perf_counter())

    def _prepare_ahead(self, items: list[Item]) -> None:
        self.pipeline.prepare(items)
        self.pipeline.infer_ahead(items)

    def _finish_pending(self, consumer: Consumer, in_rebalance: bool = False) -> None:
        batch, self._pending = self._pending, None
        if batch is None:
            return
        try:
            batch.prepared.result()
        except Exception:  # prepare records per-item failures itself; run() redoes whatever is left undone
            log.exception("preparing a batch ahead failed; preparing it again in line")
        # Partitions revoked while this batch waited belong to another replica now: it redoes them from the
        # committed offset, so this one drops them rather than racing it.
        keep = [i for i, m in enumerate(batch.messages) if (m.topic() or "", m.partition() or 0) in self.assigned]
        for i in set(range(len(batch.items))) - set(keep):
            batch.items[i].span.end()
        if not keep:
            return
        messages, items = [batch.messages[i] for i in keep], [batch.items[i] for i in keep]
        self.metrics.batch_size.record(len(messages))
        if not in_rebalance:
            self._process(consumer, messages, items, batch.began)
            return
        # Inside a rebalance callback nothing may wait on the consumer: one attempt, and if a dependency is
        # down the batch is left uncommitted for the partitions' next owner.
        try:
            self._process(consumer, messages, items, batch.began, retry=False)
        except (TransientError, redis.RedisError) as exc:
            log.warning("could not finish the batch read ahead before a rebalance (%s); it will be redone", exc)

    def _process(
        self, consumer: Consumer, messages: list[Message], items: list[Item], began: float, retry: bool = True
    ) -> None:
        def attempt(work: Callable[[], Any]) -> Any:
            return self._with_retry(consumer, work) if retry else work()

        try:
            out = attempt(lambda: self.pipeline.run(items))
            attempt(lambda: self._publish(out))
            # Retried like the rest: with a remote index (Milvus), no offset is committed before it has the rows.
            attempt(lambda: self.pipeline.commit_index(out))
            self._commit(consumer, messages)
            if self.on_batch:
                self.on_batch(out)
            self.processed_count += len(messages)
            self.metrics.processed.add(len(out.verdicts))
            for verdict, _ in out.verdicts:
                self.metrics.verdicts.add(1, {"action": verdict.action.value})
            for dead, _ in out.dead_letters:
                self.metrics.dlq.add(1, {"error_kind": dead.error_kind.value})
            self.metrics.reviews.add(len(out.reviews))
            if out.verdicts:
                self.metrics.model_version(out.verdicts[-1][0].model_version)
        finally:
            for item in items:
                item.span.end()
        self.metrics.stage("batch", time.perf_counter() - began)

    def _with_retry(self, consumer: Consumer, work: Callable[[], Any]) -> Any:
        """Retries a batch while a dependency is down; partitions stay paused so nothing runs ahead."""
        attempt = 0
        cfg = self.settings.moderator
        while True:
            try:
                result = work()
                if self.dependency_down:
                    log.info("%s is back; resuming consumption", self.dependency_down)
                    self.dependency_down = None
                    consumer.resume(consumer.assignment())
                return result
            except (TransientError, redis.RedisError) as exc:
                attempt += 1
                name = exc.dependency if isinstance(exc, TransientError) else "redis"
                if not self.dependency_down:
                    log.warning("%s unavailable (%s); pausing consumption and retrying", name, exc)
                    consumer.pause(consumer.assignment())
                self.dependency_down = name
                delay = min(cfg.retry_backoff_s * 2 ** min(attempt - 1, 10), cfg.retry_backoff_max_s)
                self._wait_paused(consumer, delay)

    def _wait_paused(self, consumer: Consumer, delay: float) -> None:
        """Keeps serving group heartbeats and rebalance callbacks while paused; nothing is consumed."""
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            self.last_loop = time.monotonic()
            for msg in consumer.consume(num_messages=100, timeout=min(0.2, max(deadline - time.monotonic(), 0))):
                if msg.error() is None:
                    # Arrived for a partition assigned during the pause: give it back for later.
                    consumer.seek(TopicPartition(msg.topic() or "", msg.partition() or 0, msg.offset() or 0))

    def _publish(self, out: BatchOutput) -> None:
        k = self.settings.kafka
        for verdict, span in out.verdicts:
            with (
                trace.use_span(span, end_on_exit=False),
                _tracer.start_as_current_span(
                    "verdict.publish", attributes={"messaging.destination.name": k.topic_verdicts}
                ),
            ):
                self.producer.produce(
                    k.topic_verdicts, verdict.upload_id, verdict.model_dump_json().encode(), inject_headers()
                )
        for review, span in out.reviews:
            with trace.use_span(span, end_on_exit=False), _tracer.start_as_current_span("review.publish"):
                self.producer.produce(
                    k.topic_review, review.upload_id, review.model_dump_json().encode(), inject_headers()
                )
        for dead, span in out.dead_letters:
            with trace.use_span(span, end_on_exit=False):
                headers = inject_headers([("error_kind", dead.error_kind.value.encode())])
                self.producer.produce(k.topic_dlq, dead.original_key, dead.model_dump_json().encode(), headers)
        began = time.perf_counter()
        self.producer.flush()
        self.metrics.stage("publish", time.perf_counter() - began)

    def _commit(self, consumer: Consumer, messages: list[Message]) -> None:
        latest: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic() or "", m.partition() or 0)
            latest[key] = max(latest.get(key, -1), m.offset() or 0)
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in latest.items() if (t, p) in self.assigned]
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:  # lost the partition in a rebalance: the new owner redoes it, idempotently
            log.warning("commit failed, work will be redelivered: %s", exc)

    def _maintenance(self, consumer: Consumer) -> None:
        now = time.monotonic()
        if now - self._last_lag > 5.0:
            self._last_lag = now
            for topic, partition in list(self.assigned):
                tp = TopicPartition(topic, partition)
                try:
                    # The high watermark cached from the last fetch response: no broker round trip. Asking the
                    # broker (cached=False) blocked this loop up to a second per partition, every 5 s (py-spy:
                    # 75% of the main thread at saturation), for a metric.
                    _low, high = consumer.get_watermark_offsets(tp, cached=True)
                    position = consumer.position([tp])[0].offset
                    if position >= 0 and high >= 0:
                        self.metrics.lag(str(partition), max(high - position, 0))
                except Exception:  # lag is best effort
                    pass
        interval = self.settings.index.sync_interval_s
        if now - self._last_maintenance < interval:
            return
        self._last_maintenance = now + interval * (random.random() - 0.5)  # jitter: replicas never sync in step
        self.pipeline.apply_threshold_overrides()
        for index in list(self.pipeline.indexes.values()):
            index.maintain()
        self.pipeline.keypoints.maintain()

    def _live(self) -> bool:
        return time.monotonic() - self.last_loop < 120.0

    def _ready(self) -> dict[str, bool]:
        try:
            redis_ok = bool(self.redis.ping())
        except redis.RedisError:
            redis_ok = False
        return {"consuming": self._live(), "dependencies": self.dependency_down is None, "redis": redis_ok}
