"""Kafka durability and failover settings: what the topics, producers and clients are configured with."""

from __future__ import annotations

import pytest

from services.cli import build_parser
from services.common.config import KafkaSettings
from services.common.kafka_io import AckedProducer, consumer_config, replication_for
from services.common.stack import LocalStack


@pytest.mark.parametrize(("brokers", "expected"), [(1, (1, 1)), (2, (2, 1)), (3, (3, 2)), (5, (3, 2))])
def test_topics_are_replicated_three_ways_with_two_in_sync_from_three_brokers(
    brokers: int, expected: tuple[int, int]
) -> None:
    assert replication_for(brokers) == expected


def test_every_producer_waits_for_all_in_sync_replicas_and_is_idempotent() -> None:
    producer = AckedProducer(KafkaSettings(bootstrap_servers="127.0.0.1:1"))
    assert producer.config["acks"] == "all" and producer.config["enable.idempotence"] is True


def test_clients_reconnect_within_a_second_and_refresh_metadata() -> None:
    conf = consumer_config(KafkaSettings())
    assert conf["reconnect.backoff.max.ms"] <= 1000  # librdkafka's default ceiling is 10 s
    assert conf["socket.connection.setup.timeout.ms"] <= 5000
    assert conf["topic.metadata.refresh.interval.ms"] <= 10000
    assert conf["session.timeout.ms"] > 2500 + 1000  # outlives fencing a dead broker plus a coordinator move


def test_the_stack_takes_one_or_three_brokers() -> None:
    assert build_parser().parse_args(["stack", "--brokers", "3"]).brokers == 3
    assert build_parser().parse_args(["stack"]).brokers == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stack", "--brokers", "2"])
    with pytest.raises(ValueError, match="majority"):
        LocalStack(brokers=2, with_triton=False)
    cluster = LocalStack(brokers=3, with_triton=False, name="unit")
    assert len(getattr(cluster.kafka, "nodes", [])) == 3
