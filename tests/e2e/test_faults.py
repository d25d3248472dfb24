"""Fault cases on the real servers: afterwards every upload has exactly one effective verdict and none is missing.

The servers these tests stop, kill and freeze are this module's own (``stack`` below), never the session's
shared ones; after each case every one of them is restarted if needed and checked before the next case runs.
What a stalled Triton costs in memory is measured in bench/faults.py, not asserted here.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common.config import Settings
from services.common.kafka_io import ensure_topics
from services.common.photos.build import Manifest
from services.common.stack import LocalStack, StackEndpoints
from services.common.uploads import UploadPublisher, event_for_file
from tests.e2e.conftest import (
    ModeratorProcess,
    pick_photos,
    read_topic,
    served_version,
    start_moderator,
    write_photo,
)
from tests.promotion_support import wait_for


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    """This module's own Kafka, Redis and Triton: one failed restart here cannot fail the rest of the session."""
    local = LocalStack(name="faults")
    local.start(progress=False)
    yield local
    local.stop()


@pytest.fixture(scope="module")
def endpoints(stack: LocalStack) -> StackEndpoints:
    return stack.endpoints()


@pytest.fixture(autouse=True)
def _restored(stack: LocalStack) -> Iterator[None]:
    """After each case: anything it stopped or froze is restarted, then every server must answer again."""
    yield
    stack.restore(timeout_s=180)
    assert stack.restore() == [], "a server did not come back after its fault test"


def _uploads(photo_set: Manifest, folder: Path, prefix: str, n: int, seed: int) -> list[tuple[str, Path]]:
    records = pick_photos(photo_set, n, seed)
    return [(f"{prefix}{i:03d}", write_photo(photo_set, r, folder, f"{prefix}{i:03d}")) for i, r in enumerate(records)]


def _publish(settings: Settings, uploads: list[tuple[str, Path]]) -> None:
    UploadPublisher(settings.kafka).publish(event_for_file(path, uid) for uid, path in uploads)


def _verdict_ids(settings: Settings, expected: int, timeout_s: float = 180) -> set[str]:
    return {str(r["upload_id"]) for r in read_topic(settings, settings.kafka.topic_verdicts, expected, timeout_s)}


def _assert_no_dead_letters(settings: Settings) -> None:
    assert read_topic(settings, settings.kafka.topic_dlq, 1, timeout_s=3) == []


def test_triton_outage_pauses_consumption_and_resumes(
    stack: LocalStack,
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    uploads = _uploads(photo_set, tmp_path, "t", 16, 31)
    ensure_topics(settings.kafka)
    replica = start_moderator(moderators, {**stack_env, "SIEVE_MODERATOR_RETRY_BACKOFF_MAX_S": "2"}, tmp_path)
    _publish(settings, uploads[:8])
    assert len(_verdict_ids(settings, 8)) == 8
    assert stack.triton is not None
    stack.triton.stop()
    try:
        _publish(settings, uploads[8:])
        wait_for(lambda: "pausing consumption" in replica.log(), 120, "the replica to pause consumption")
        assert len(_verdict_ids(settings, 16, timeout_s=5)) == 8  # nothing decided without the model
    finally:
        stack.triton.restart(stack.log_dir, 120)
    assert _verdict_ids(settings, 16) == {uid for uid, _ in uploads}, replica.log()[-3000:]
    assert "resuming consumption" in replica.log()
    _assert_no_dead_letters(settings)


def test_redis_stopped_and_restarted_loses_nothing(
    stack: LocalStack,
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    uploads = _uploads(photo_set, tmp_path, "r", 16, 32)
    ensure_topics(settings.kafka)
    replica = start_moderator(moderators, stack_env, tmp_path)
    _publish(settings, uploads[:8])
    assert len(_verdict_ids(settings, 8)) == 8
    stack.redis.stop()
    try:
        _publish(settings, uploads[8:])
        # The replica keeps serving from its local index while Redis is down.
        assert _verdict_ids(settings, 16) == {uid for uid, _ in uploads}, replica.log()[-3000:]
    finally:
        stack.redis.restart(stack.log_dir, 30)
    if settings.index.backend == "milvus":  # the index lives in Milvus, which stayed up: every row is there
        from services.common.index.milvus_index import MilvusRecentIndex

        strong = settings.milvus.model_copy(update={"consistency": "Strong"})  # sees every row; no clock needed
        index = MilvusRecentIndex(strong, settings.redis.key_prefix, served_version(), 1, 3600)
        assert index.count() == 16
    else:
        client = redis.Redis.from_url(settings.redis.url.get_secret_value())
        stream = f"{settings.redis.key_prefix}:index:{served_version()}:stream"
        wait_for(lambda: client.xlen(stream) >= 16, 60, "additions made during the outage to be flushed to Redis")
        assert client.xlen(stream) == 16
    _assert_no_dead_letters(settings)


def test_broker_restart_loses_nothing(
    stack: LocalStack,
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    uploads = _uploads(photo_set, tmp_path, "b", 16, 33)
    ensure_topics(settings.kafka)
    replica = start_moderator(moderators, stack_env, tmp_path)
    _publish(settings, uploads[:8])
    assert len(_verdict_ids(settings, 8)) == 8
    stack.kafka.restart(stack.log_dir, 120)
    _publish(settings, uploads[8:])
    verdicts = read_topic(settings, settings.kafka.topic_verdicts, 16)
    ids = [str(r["upload_id"]) for r in verdicts]
    assert set(ids) == {uid for uid, _ in uploads}, replica.log()[-3000:]
    # Redelivery after a restart may repeat a verdict, but it is the same verdict (idempotent by event_id).
    by_id: dict[str, set[str]] = {}
    for r in verdicts:
        by_id.setdefault(str(r["upload_id"]), set()).add(str(r["event_id"]) + str(r["action"]) + str(r["duplicate_of"]))
    assert all(len(v) == 1 for v in by_id.values())


def test_stalled_triton_applies_backpressure(
    stack: LocalStack,
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    uploads = _uploads(photo_set, tmp_path, "s", 12, 34)
    many = [(f"s-many-{n:04d}", uploads[n % len(uploads)][1]) for n in range(300)]
    ensure_topics(settings.kafka)
    replica = start_moderator(moderators, {**stack_env, "SIEVE_TRITON_TIMEOUT_S": "120"}, tmp_path)
    _publish(settings, many[:4])
    assert len(_verdict_ids(settings, 4)) == 4
    assert replica.proc is not None and stack.triton is not None and stack.triton.process is not None
    triton_pid = stack.triton.process.pid
    assert triton_pid is not None
    os.killpg(triton_pid, signal.SIGSTOP)  # Triton hangs: requests neither answer nor fail
    try:
        _publish(settings, many[4:])
        # Waits for every verdict, and must time out: with Triton frozen at most the batch in flight gets through.
        decided = len(_verdict_ids(settings, len(many), timeout_s=10))
        assert replica.proc.poll() is None, "the replica died while Triton was stalled"
    finally:
        os.killpg(triton_pid, signal.SIGCONT)
    assert decided < 4 + 2 * settings.moderator.batch_size  # at most the batch in flight got through
    assert len(_verdict_ids(settings, len(many), timeout_s=400)) == len(many)
