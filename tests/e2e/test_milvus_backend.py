"""The moderator on the Milvus index backend, against a real Milvus standalone server of this module's own.

Runs in every test session whatever SIEVE_INDEX_BACKEND says (the rest of the suite follows that setting): two
replicas must find each other's uploads through Milvus, and a kill -9 of Milvus mid-stream must lose nothing.
The server is this module's, so killing it cannot disturb the session's stack.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient
from PIL import Image

from services.common.config import Settings
from services.common.index.milvus_index import MilvusRecentIndex
from services.common.kafka_io import ensure_topics
from services.common.photos.build import Manifest
from services.common.stack import LocalStack
from services.common.stack.milvus import MilvusServer
from services.common.transforms import NEAR_DUPLICATES, encode_jpeg
from services.common.uploads import UploadPublisher, event_for_file
from tests.e2e.conftest import (
    ModeratorProcess,
    PhotoSample,
    pick_photos,
    read_topic,
    served_version,
    start_moderator,
    write_photo,
)
from tests.promotion_support import wait_for


@pytest.fixture(scope="module")
def milvus(stack: LocalStack) -> Iterator[MilvusServer]:
    server = MilvusServer(stack.home / "milvus-e2e", stack.settings.cache_dir, stack.settings.milvus_version)
    server.start(stack.log_dir, stack.settings.start_timeout_s)
    yield server
    server.stop()


@pytest.fixture()
def milvus_env(stack_env: dict[str, str], milvus: MilvusServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        **stack_env,
        "SIEVE_INDEX_BACKEND": "milvus",
        "SIEVE_MILVUS_URI": milvus.uri,
        "SIEVE_MILVUS_TIMEOUT_S": "3",
        "SIEVE_MODERATOR_RETRY_BACKOFF_MAX_S": "2",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def _plant(manifest: Manifest, folder: Path, originals: int, seed: int, prefix: str) -> list[PhotoSample]:
    """Originals, then one hard copy (crop + JPEG 50) of each."""
    samples, copies = [], []
    for n, record in enumerate(pick_photos(manifest, originals, seed)):
        uid = f"{prefix}orig-{n:03d}"
        path = write_photo(manifest, record, folder, uid)
        samples.append(PhotoSample(uid, path, None))
        with Image.open(path) as img:
            data = encode_jpeg(NEAR_DUPLICATES["crop90_jpeg50"](img.convert("RGB")), 85)
        # Not "<prefix>copy-<n>": partitions are CRC32 of the key, and names that differ from the original's in
        # fixed places land on a fixed partition pair, always the same replica's. A hashed tail spreads them.
        cid = f"{prefix}copy-{n:03d}-{hashlib.sha1(uid.encode()).hexdigest()[:6]}"
        cpath = folder / f"{cid}.jpg"
        cpath.write_bytes(data)
        copies.append(PhotoSample(cid, cpath, uid))
    return samples + copies


def _check_copies_matched(settings: Settings, samples: list[PhotoSample], moderators: list[ModeratorProcess]) -> None:
    records = read_topic(settings, settings.kafka.topic_verdicts, len(samples))
    verdicts = {str(r["upload_id"]): r for r in records}
    assert set(verdicts) == {s.upload_id for s in samples}, [m.log()[-3000:] for m in moderators]
    for s in samples:
        matches = [str(d["upload_id"]) for d in verdicts[s.upload_id]["duplicate_of"]]  # type: ignore[union-attr]
        if s.original is None:
            assert matches == [], f"{s.upload_id} flagged as a duplicate of {matches}"
        else:
            assert matches[:1] == [s.original], f"{s.upload_id} matched {matches}"


def _owners(settings: Settings) -> dict[int, str]:
    """uploads partition -> the group member that owns it now."""
    admin = AdminClient(settings.kafka.client_config())
    group = settings.kafka.consumer_group
    try:
        described = admin.describe_consumer_groups([group], request_timeout=10)[group].result(timeout=15)
    except KafkaException:  # the group's coordinator is still being found: nobody owns anything yet
        return {}
    return {
        tp.partition: member.member_id
        for member in described.members
        for tp in member.assignment.topic_partitions
        if tp.topic == settings.kafka.topic_uploads
    }


def _partitions(settings: Settings, count: int) -> dict[str, int]:
    """upload id -> the uploads partition its event went to, read back from the topic."""
    consumer = Consumer(
        {**settings.kafka.client_config(), "group.id": f"where-{time.monotonic_ns()}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([settings.kafka.topic_uploads])
    found: dict[str, int] = {}
    deadline = time.monotonic() + 60
    try:
        while len(found) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                found[(msg.key() or b"").decode()] = msg.partition() or 0
    finally:
        consumer.close()
    return found


def _rows(settings: Settings) -> int:
    strong = settings.milvus.model_copy(update={"consistency": "Strong"})  # sees every row; no clock needed
    return MilvusRecentIndex(strong, settings.redis.key_prefix, served_version(), 1, 3600).count()


def test_two_replicas_on_milvus_find_each_others_uploads(
    milvus_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    settings = Settings()
    samples = _plant(photo_set, tmp_path, 12, 41, "m")
    ensure_topics(settings.kafka)
    start_moderator(moderators, milvus_env, tmp_path)
    start_moderator(moderators, milvus_env, tmp_path)
    # Both replicas own partitions before anything is published: otherwise one could decide everything.
    wait_for(lambda: len(set(_owners(settings).values())) == 2, 120, "both replicas to own uploads partitions")
    owners = _owners(settings)
    publisher = UploadPublisher(settings.kafka)
    originals = [s for s in samples if s.original is None]
    publisher.publish(event_for_file(s.path, s.upload_id) for s in originals)
    assert len(read_topic(settings, settings.kafka.topic_verdicts, len(originals))) >= len(originals)
    # Keys spread the copies over the partitions, so most are decided by the replica that did not see the original.
    publisher.publish(event_for_file(s.path, s.upload_id) for s in samples if s.original is not None)
    _check_copies_matched(settings, samples, moderators)
    assert _rows(settings) == len(samples)
    assert _owners(settings) == owners, "the group rebalanced mid-test: who decided what is unknown"
    where = _partitions(settings, len(samples))
    across = [s for s in samples if s.original and owners[where[s.upload_id]] != owners[where[s.original]]]
    assert across, f"no copy was decided by the replica that did not see its original: {owners} {where}"


def test_milvus_killed_mid_stream_loses_nothing(
    milvus: MilvusServer,
    stack: LocalStack,
    milvus_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    settings = Settings()
    samples = _plant(photo_set, tmp_path, 16, 42, "k")
    originals = [s for s in samples if s.original is None]
    copies = [s for s in samples if s.original is not None]
    ensure_topics(settings.kafka)
    replica = start_moderator(moderators, milvus_env, tmp_path)
    publisher = UploadPublisher(settings.kafka)
    publisher.publish(event_for_file(s.path, s.upload_id) for s in originals[:8])
    assert len(read_topic(settings, settings.kafka.topic_verdicts, 8)) >= 8, replica.log()[-3000:]
    assert milvus.process is not None
    milvus.process.kill()  # SIGKILL: no flush, no goodbye
    try:
        publisher.publish(event_for_file(s.path, s.upload_id) for s in originals[8:])
        wait_for(lambda: "pausing consumption" in replica.log(), 120, "the replica to pause on Milvus")
    finally:
        milvus.start(stack.log_dir, stack.settings.start_timeout_s, fresh=False)
    assert len(read_topic(settings, settings.kafka.topic_verdicts, len(originals))) >= len(originals)
    # Only now the copies: partitions are not ordered among themselves, and a copy decided before its original
    # would rightly make the original the duplicate.
    publisher.publish(event_for_file(s.path, s.upload_id) for s in copies)
    _check_copies_matched(settings, samples, moderators)  # copies of pre-kill originals still found
    assert "resuming consumption" in replica.log()
    assert _rows(settings) == len(samples)
    assert read_topic(settings, settings.kafka.topic_dlq, 1, timeout_s=3) == []
