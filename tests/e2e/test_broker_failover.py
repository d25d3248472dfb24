"""kill -9 of a partition leader on a three-broker cluster, mid-stream: nothing lost, no conflicting verdicts.

The cluster is this module's own (``sieve stack --brokers 3``'s KafkaCluster); the moderators use the session's
Redis and Triton. Each case restarts the killed broker and checks all three answer before the next case. How
fast processing resumes is measured in bench/broker_failover.py, not asserted here.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]

from services.common.config import Settings, StackSettings
from services.common.kafka_io import ensure_topics
from services.common.photos.build import Manifest
from services.common.stack.kafka import KafkaCluster
from services.common.uploads import UploadPublisher, event_for_file
from tests.e2e.conftest import ModeratorProcess, pick_photos, read_topic, start_moderator, write_photo
from tests.promotion_support import wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    cfg = StackSettings()
    home = tmp_path_factory.mktemp("cluster")
    nodes = KafkaCluster(home / "kafka", cfg.cache_dir, cfg.kafka_version, size=3)
    nodes.start(home / "logs", cfg.start_timeout_s)
    yield nodes
    nodes.stop()


@pytest.fixture()
def on_cluster(
    cluster: KafkaCluster, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[Settings, dict[str, str]]]:
    """This test's topics on the cluster; afterwards the killed broker is back and all three answer."""
    monkeypatch.setenv("SIEVE_KAFKA_BOOTSTRAP_SERVERS", cluster.bootstrap)
    yield Settings(), {**stack_env, "SIEVE_KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap}
    cluster.restart(tmp_path / "logs", 180)
    assert all(node.ready() for node in cluster.nodes)


def _stream(settings: Settings, uploads: list[tuple[str, Path]], every_s: float) -> threading.Thread:
    """Publishes the uploads one by one in the background, as a steady stream does."""

    def run() -> None:
        publisher = UploadPublisher(settings.kafka)
        for uid, path in uploads:
            publisher.publish([event_for_file(path, uid)])
            time.sleep(every_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _assert_replicated(settings: Settings, cluster: KafkaCluster) -> None:
    admin = AdminClient(settings.kafka.client_config())
    topics = [settings.kafka.topic_uploads, settings.kafka.topic_verdicts]
    # A topic just created reaches every broker's metadata a moment later; the one asked may not know it yet.
    wait_for(lambda: set(topics) <= set(admin.list_topics(timeout=10).topics), 30, f"{topics} in the metadata")
    meta = admin.list_topics(timeout=10)
    for topic in topics:
        assert all(len(p.replicas) == 3 for p in meta.topics[topic].partitions.values()), topic
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
    for future in admin.describe_configs(resources).values():
        assert future.result(timeout=10)["min.insync.replicas"].value == "2"


@pytest.mark.parametrize("victim", ["uploads", "verdicts"])
def test_killing_a_partition_leader_mid_stream_loses_nothing(
    victim: str,
    cluster: KafkaCluster,
    on_cluster: tuple[Settings, dict[str, str]],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    settings, env = on_cluster
    records = pick_photos(photo_set, 16, 61 if victim == "uploads" else 62)
    uploads = [
        (f"{victim[0]}{i:03d}", write_photo(photo_set, r, tmp_path, f"{victim[0]}{i:03d}"))
        for i, r in enumerate(records)
    ]
    ensure_topics(settings.kafka)
    _assert_replicated(settings, cluster)
    replicas = [start_moderator(moderators, env, tmp_path) for _ in range(2)]
    stream = _stream(settings, uploads, every_s=0.5)
    flowing = read_topic(settings, settings.kafka.topic_verdicts, 3)
    assert len({v["upload_id"] for v in flowing}) >= 3, "no verdicts before the fault: the stream was not flowing"
    topic = settings.kafka.topic_uploads if victim == "uploads" else settings.kafka.topic_verdicts
    leader = cluster.leader_of(topic, 0)
    assert stream.is_alive(), "the stream ended before the fault: nothing would be produced across it"
    cluster.node(leader).kill()
    wait_for(lambda: cluster.leader_of(topic, 0) not in (leader, -1), 60, f"a new leader for {topic}[0]")
    stream.join(120)
    verdicts = read_topic(settings, settings.kafka.topic_verdicts, len(uploads))
    logs = "\n".join(r.log()[-2000:] for r in replicas)
    assert {str(v["upload_id"]) for v in verdicts} == {uid for uid, _ in uploads}, logs
    # Redelivery after the failover may repeat a verdict, but never with a different decision.
    decisions: dict[str, set[str]] = {}
    for v in verdicts:
        key = json.dumps([v["event_id"], v["action"], v["duplicate_of"]], sort_keys=True)
        decisions.setdefault(str(v["upload_id"]), set()).add(key)
    assert all(len(d) == 1 for d in decisions.values()), decisions
    assert read_topic(settings, settings.kafka.topic_dlq, 1, timeout_s=3) == []
    assert all(r.proc is not None and r.proc.poll() is None for r in replicas), logs


def test_with_two_of_three_brokers_lost_a_write_fails_loudly_and_its_retry_lands_once_they_are_back(
    cluster: KafkaCluster, on_cluster: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    """acks=all and min.insync.replicas=2 (what ensure_topics gives every topic): with two brokers gone a write
    cannot be acknowledged, and the producer says so instead of reporting success. Its outcome is unknown, not
    refused: the surviving leader may hold it and the returning followers copy it (seen in a full run), which is
    why a failed flush means "redeliver", and verdicts are idempotent. The retry lands; nothing else appears."""
    from confluent_kafka import Consumer
    from confluent_kafka.admin import NewTopic

    from services.common.errors import TransientError
    from services.common.kafka_io import AckedProducer

    settings, _ = on_cluster
    topic = f"sieve-two-lost-{time.time_ns()}"
    admin = AdminClient(settings.kafka.client_config())
    admin.create_topics([NewTopic(topic, 1, 3, config={"min.insync.replicas": "2"})])[topic].result(30)
    wait_for(lambda: cluster.leader_of(topic, 0) > 0, 30, f"a leader for {topic}")
    survivor = cluster.leader_of(topic, 0)
    for node in cluster.nodes:
        if node.node_id != survivor:
            node.kill()
    producer = AckedProducer(settings.kafka, {"message.timeout.ms": 8000})
    producer.produce(topic, "lost", b"written while two of three brokers were down")
    with pytest.raises(TransientError, match=r"unacknowledged|errors"):
        producer.flush(30)

    cluster.restart(tmp_path / "logs", 180)
    retry = AckedProducer(settings.kafka)
    retry.produce(topic, "lost", b"written again once they were back")
    retry.flush(60)
    consumer = Consumer(
        {**settings.kafka.client_config(), "group.id": f"check-{topic}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not values:
        msg = consumer.poll(1.0)
        if msg is not None and msg.error() is None:
            values.append(msg.value())
    time.sleep(2)  # anything else in the partition arrives by now
    while (msg := consumer.poll(1.0)) is not None:
        if msg.error() is None:
            values.append(msg.value())
    consumer.close()
    assert b"written again once they were back" in values
    assert set(values) <= {b"written while two of three brokers were down", b"written again once they were back"}
