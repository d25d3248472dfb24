"""How long does moderation stall when Kafka loses a broker? Target: resumed within 5 s.

Two stacks, each with real moderator replicas under a steady stream of distinct photos:

- three brokers (``sieve stack --brokers 3``): kill -9 of the leader of an uploads partition, then (once it is
  back) of the leader of a verdicts partition. Resume time: from the kill to the first verdict, on a partition
  that broker led, for an upload produced after the kill.
- one broker (the default stack): kill -9, restart on the same ports and data. Resume time: from the broker
  answering again to the first verdict for an upload produced after the kill (held by the producer meanwhile).

Three rounds of each (one with --quick); the target is met when the worst round is. Both also check what the
fault tests check: every upload got a verdict, and no upload got two different ones.
Run: ``python -m bench.broker_failover [--quick]``; writes bench/results/broker_failover.json.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Message, Producer

from bench.common import Progress, StageResult, Target, main_for
from bench.stream import Replica, prepare_images
from services.common.config import Settings
from services.common.kafka_io import ensure_topics
from services.common.schemas import UploadEvent
from services.common.stack import LocalStack
from services.common.stack.kafka import KafkaBroker, KafkaCluster

TARGET_S = 5.0


@dataclass
class Traffic:
    """A steady stream of uploads and a reader of every verdict, both timed on this process's clock."""

    settings: Settings
    images: list[Path]
    rate_per_s: float
    produced: dict[str, tuple[float, int]] = field(default_factory=dict)  # upload_id -> (when, uploads partition)
    verdicts: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)  # (arrived, partition, body)
    _stop: threading.Event = field(default_factory=threading.Event)  # the producer's
    _stop_reading: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Traffic:
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._produce, self._read)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._stop_reading.set()
        for t in self._threads:
            t.join(30)

    def _produce(self) -> None:
        producer = Producer({**self.settings.kafka.client_config(), "enable.idempotence": True, "acks": "all"})
        images = itertools.cycle(self.images)
        n = 0
        next_at = time.monotonic()

        def acked(err: object, msg: Message) -> None:
            if err is None:
                key = (msg.key() or b"").decode()
                with self._lock:
                    self.produced[key] = (self.produced[key][0], msg.partition() or 0)

        while not self._stop.is_set():
            upload_id = f"f-{n:06d}-{uuid.uuid4().hex[:6]}"
            event = UploadEvent(
                event_id=uuid.uuid4().hex,
                upload_id=upload_id,
                user_id="bench",
                image_uri=next(images).as_uri(),
                created_at=datetime.now(UTC),
            )
            with self._lock:
                self.produced[upload_id] = (time.monotonic(), -1)
            producer.produce(
                self.settings.kafka.topic_uploads, key=upload_id, value=event.model_dump_json(), on_delivery=acked
            )
            producer.poll(0)
            n += 1
            next_at += 1.0 / self.rate_per_s
            time.sleep(max(0.0, next_at - time.monotonic()))
        producer.flush(120)

    def _read(self) -> None:
        consumer = Consumer(
            {
                **self.settings.kafka.client_config(),
                "group.id": f"bench-reader-{uuid.uuid4().hex[:6]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 100,  # as the moderators fetch: the reader adds little to what it measures
                "fetch.error.backoff.ms": 100,
            }
        )
        consumer.subscribe([self.settings.kafka.topic_verdicts])
        try:
            while not self._stop_reading.is_set():
                msg = consumer.poll(0.2)
                if msg is None or msg.error():
                    continue
                with self._lock:
                    self.verdicts.append((time.monotonic(), msg.partition() or 0, json.loads(msg.value() or b"{}")))
        finally:
            consumer.close()

    def latency_s(self, last: int = 20) -> float | None:
        """Median seconds from an upload's produce call to its verdict being read, over the last verdicts."""
        with self._lock:
            spans = [
                arrived - self.produced[str(body["upload_id"])][0]
                for arrived, _, body in self.verdicts[-last:]
                if str(body["upload_id"]) in self.produced
            ]
        return round(statistics.median(spans), 2) if spans else None

    def count(self) -> int:
        with self._lock:
            return len({v[2]["upload_id"] for v in self.verdicts})

    def first_verdict_after(
        self, t0: float, verdict_partitions: set[int] | None = None, produced_after: float | None = None
    ) -> float | None:
        """Seconds from t0 to the first verdict for an upload produced after ``produced_after`` (default t0),
        optionally only on these verdicts partitions."""
        since = t0 if produced_after is None else produced_after
        with self._lock:
            times = [
                arrived
                for arrived, partition, body in self.verdicts
                if arrived >= t0
                and self.produced.get(str(body["upload_id"]), (0.0, 0))[0] > since
                and (verdict_partitions is None or partition in verdict_partitions)
            ]
        return round(min(times) - t0, 2) if times else None

    def first_verdict_from_uploads(self, t0: float, upload_partitions: set[int]) -> float | None:
        """Seconds from t0 to the first verdict for an upload produced after t0 onto these uploads partitions."""
        with self._lock:
            wanted = {uid for uid, (when, part) in self.produced.items() if when > t0 and part in upload_partitions}
            times = [arrived for arrived, _, body in self.verdicts if body["upload_id"] in wanted]
        return round(min(times) - t0, 2) if times else None

    def audit(self, settle_s: float = 120.0) -> dict[str, int]:
        """Stops the stream, then reads until every upload has a verdict (or ``settle_s``): none may be missing,
        and none may have two different ones."""
        self._stop.set()
        for producer in self._threads[:1]:
            producer.join(150)  # it flushes what it holds
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and self.count() < len(self.produced):
            time.sleep(0.5)
        self._stop_reading.set()
        for reader in self._threads[1:]:
            reader.join(30)
        seen: dict[str, set[str]] = {}
        for _, _, body in self.verdicts:
            key = json.dumps([body["event_id"], body["action"], body["duplicate_of"]], sort_keys=True)
            seen.setdefault(str(body["upload_id"]), set()).add(key)
        return {
            "produced": len(self.produced),
            "verdicts": len(self.verdicts),
            "lost": len(set(self.produced) - set(seen)),
            "conflicting": sum(len(v) > 1 for v in seen.values()),
        }


def _leader_partitions(cluster: KafkaCluster, topic: str, node_id: int, partitions: int) -> set[int]:
    return {p for p in range(partitions) if cluster.leader_of(topic, p) == node_id}


@contextmanager
def _running(stack: LocalStack, replicas: int, workdir: Path, progress: Progress) -> Iterator[Settings]:
    """The stack with its own topics, N moderator replicas in one group; stops all of it afterwards."""
    endpoints = stack.start(progress=False)
    ns = uuid.uuid4().hex[:6]
    env = {
        **os.environ,
        **endpoints.env(),
        "SIEVE_KAFKA_TOPIC_UPLOADS": f"uploads-{ns}",
        "SIEVE_KAFKA_TOPIC_VERDICTS": f"verdicts-{ns}",
        "SIEVE_KAFKA_TOPIC_REVIEW": f"review-{ns}",
        "SIEVE_KAFKA_TOPIC_FEEDBACK": f"feedback-{ns}",
        "SIEVE_KAFKA_TOPIC_DLQ": f"uploads.dlq-{ns}",
        "SIEVE_KAFKA_CONSUMER_GROUP": f"moderator-{ns}",
        "SIEVE_REDIS_KEY_PREFIX": f"failover-{ns}",
        "SIEVE_FETCH_FILE_ROOTS": json.dumps([str(workdir)]),
        "SIEVE_MODERATOR_BATCH_TIMEOUT_MS": "100",
        "SIEVE_OTEL_EXPORTER": "none",
    }
    previous = dict(os.environ)
    os.environ.update(env)
    settings = Settings()
    ensure_topics(settings.kafka)
    logs = [workdir / f"moderator-{ns}-{i}.log" for i in range(replicas)]
    started = [Replica(env, log) for log in logs]
    try:
        # Each replica's log says when it got partitions. (Not AdminClient.describe_consumer_groups: on a
        # cluster, librdkafka 2.x can abort the process in it while the group coordinator is being chosen.)
        deadline = time.monotonic() + 180
        while not all(log.exists() and '"msg": "assigned [' in log.read_text(errors="replace") for log in logs):
            if time.monotonic() > deadline:
                raise TimeoutError("the replicas did not get partitions within 180 s")
            time.sleep(0.5)
        progress(f"{replicas} replicas own partitions")
        yield settings
    finally:
        for r in started:
            r.stop()
        stack.stop()
        os.environ.clear()
        os.environ.update(previous)


def _warm(traffic: Traffic, n: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while traffic.count() < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {traffic.count()} verdicts after {timeout_s:.0f}s of warm-up")
        time.sleep(0.2)


def _drained(traffic: Traffic, timeout_s: float = 180) -> None:
    """Until the backlog of the last fault is decided, so the next round starts from ordinary latency."""
    _warm(traffic, len(traffic.produced) - 4, timeout_s)
    _warm(traffic, traffic.count() + 8, timeout_s)


def _wait_resumed(traffic: Traffic, probe: Any, timeout_s: float = 120.0) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return float(value)
        time.sleep(0.2)
    return None


def cluster_case(
    result: StageResult, images: list[Path], workdir: Path, rate: float, rounds: int, progress: Progress
) -> dict[str, list[float | None]]:
    """``rounds`` kills of the uploads leader and of the verdicts leader, alternating; each broker restarted."""
    stack = LocalStack(brokers=3, name="failover3")
    assert isinstance(stack.kafka, KafkaCluster)
    cluster = stack.kafka
    figures: dict[str, list[float | None]] = {"uploads": [], "verdicts": []}
    with _running(stack, 2, workdir, progress) as settings:
        traffic = Traffic(settings, images, rate).start()
        _warm(traffic, 10)
        first_row = len(result.rows)
        for _ in range(rounds):
            for name, topic in (("uploads", settings.kafka.topic_uploads), ("verdicts", settings.kafka.topic_verdicts)):
                baseline = traffic.latency_s()
                leader = cluster.leader_of(topic, 0)
                led = _leader_partitions(cluster, topic, leader, settings.kafka.partitions)
                progress(f"kill -9 broker {leader}, leader of {name} partitions {sorted(led)}")
                t_kill = time.monotonic()
                cluster.node(leader).kill()
                if name == "uploads":
                    resumed = _wait_resumed(traffic, lambda: traffic.first_verdict_from_uploads(t_kill, led))  # noqa: B023
                else:
                    resumed = _wait_resumed(traffic, lambda: traffic.first_verdict_after(t_kill, led))  # noqa: B023
                figures[name].append(resumed)
                new_leader = cluster.leader_of(topic, 0)
                progress(f"resumed after {resumed} s (new leader of partition 0: broker {new_leader})")
                result.add_row(
                    f"3 brokers: leader of {name} killed",
                    killed_broker=leader,
                    partitions_it_led=sorted(led),
                    new_leader=new_leader,
                    time_to_resume_s=resumed,
                    verdict_latency_before_s=baseline,
                )
                cluster.restart(stack.log_dir, 180)  # back to three before the next kill
                _drained(traffic)
        audit = traffic.audit()
        for row in result.rows[first_row:]:
            row.update(audit)
    return figures


def single_case(
    result: StageResult, images: list[Path], workdir: Path, rate: float, rounds: int, progress: Progress
) -> list[float | None]:
    stack = LocalStack(name="failover1")
    assert isinstance(stack.kafka, KafkaBroker)
    broker = stack.kafka
    figures: list[float | None] = []
    with _running(stack, 2, workdir, progress) as settings:
        traffic = Traffic(settings, images, rate).start()
        _warm(traffic, 10)
        first_row = len(result.rows)
        for _ in range(rounds):
            baseline = traffic.latency_s()
            progress("kill -9 the only broker, then restart it")
            t_kill = time.monotonic()
            broker.kill()
            broker.restart(stack.log_dir, 180)
            t_back = time.monotonic()
            # The first upload produced after the kill: no replica can have fetched it before the broker's return.
            resumed = _wait_resumed(traffic, lambda: traffic.first_verdict_after(t_back, produced_after=t_kill))  # noqa: B023
            figures.append(resumed)
            progress(f"broker back after {t_back - t_kill:.1f} s; resumed {resumed} s after that")
            result.add_row(
                "1 broker: killed and restarted",
                broker_down_s=round(t_back - t_kill, 2),
                time_to_resume_s=resumed,
                verdict_latency_before_s=baseline,
            )
            _drained(traffic)
        audit = traffic.audit()
        for row in result.rows[first_row:]:
            row.update(audit)
    return figures


def run(quick: bool = False) -> dict[str, Any]:
    result = StageResult("broker_failover", "Time to resume after losing a Kafka broker", quick).begin()
    progress = Progress("broker_failover")
    rate, rounds = 4.0, 1 if quick else 3
    result.params = {"replicas": 2, "uploads_per_s": rate, "partitions": Settings().kafka.partitions, "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="sieve-failover-") as tmp:
        workdir = Path(tmp)
        images = prepare_images(workdir / "images", 120 if quick else 400)
        cluster = cluster_case(result, images, workdir, rate, rounds, progress)
        single = single_case(result, images, workdir, rate, rounds, progress)
    for name, values in (
        ("uploads_leader_kill_resume_s", cluster["uploads"]),
        ("verdicts_leader_kill_resume_s", cluster["verdicts"]),
        ("single_broker_return_resume_s", single),
    ):
        known = [v for v in values if v is not None]
        worst = max(known) if len(known) == len(values) else None  # a round that never resumed fails the target
        result.targets.append(Target(name, worst, TARGET_S, "<=", f"seconds, worst of {len(values)}: {values}"))
    result.notes.append(
        "Resume time on the cluster counts from the kill; on the single broker from its return (its restart time "
        "is broker_down_s). Each includes a verdict's ordinary latency (verdict_latency_before_s: the median, "
        "upload produced to verdict read, over the 20 verdicts before the fault). Targets are the worst round. "
        "Client settings: KafkaSettings.client_config (reconnect backoff at most 1 s, connection set-up 5 s); "
        "broker settings: services/common/stack/kafka.py (a silent node fenced after 1.5 s)."
    )
    return result.finish().to_dict()


if __name__ == "__main__":
    raise SystemExit(main_for("broker_failover", run))
