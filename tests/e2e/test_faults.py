"""Fault cases on the real servers: afterwards every upload has exactly one effective verdict and none is missing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import redis

from services.common.config import Settings
from services.common.kafka_io import ensure_topics
from services.common.photos.build import Manifest
from services.common.stack import LocalStack
from services.common.uploads import UploadPublisher, event_for_file
from tests.e2e.conftest import (
    ModeratorProcess,
    pick_photos,
    read_topic,
    served_version,
    start_moderator,
    write_photo,
)


def _uploads(photo_set: Manifest, folder: Path, prefix: str, n: int, seed: int) -> list[tuple[str, Path]]:
    records = pick_photos(photo_set, n, seed)
    return [(f"{prefix}{i:03d}", write_photo(photo_set, r, folder, f"{prefix}{i:03d}")) for i, r in enumerate(records)]


def _publish(settings: Settings, uploads: list[tuple[str, Path]]) -> None:
    UploadPublisher(settings.kafka).publish(event_for_file(path, uid) for uid, path in uploads)


def _verdict_ids(settings: Settings, expected: int, timeout_s: float = 180) -> set[str]:
    return {str(r["upload_id"]) for r in read_topic(settings, settings.kafka.topic_verdicts, expected, timeout_s)}


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


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
        time.sleep(8)
        assert len(_verdict_ids(settings, 16, timeout_s=3)) == 8  # nothing decided without the model
        assert "pausing consumption" in replica.log()
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
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    stream = f"{settings.redis.key_prefix}:index:{served_version()}:stream"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and client.xlen(stream) < 16:
        time.sleep(1)
    assert client.xlen(stream) == 16, "additions made during the outage were not flushed to Redis"
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


def test_stalled_triton_applies_backpressure_with_bounded_memory(
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
    before = _rss_kb(replica.proc.pid)
    os.killpg(triton_pid, signal.SIGSTOP)  # Triton hangs: requests neither answer nor fail
    try:
        _publish(settings, many[4:])
        time.sleep(10)
        after = _rss_kb(replica.proc.pid)
        decided = len(_verdict_ids(settings, len(many), timeout_s=3))
    finally:
        os.killpg(triton_pid, signal.SIGCONT)
    assert decided < 4 + 2 * settings.moderator.batch_size  # at most the batch in flight got through
    assert after - before < 100_000, f"RSS grew by {(after - before) // 1024} MiB while Triton was stalled"
    assert len(_verdict_ids(settings, len(many), timeout_s=400)) == len(many)
