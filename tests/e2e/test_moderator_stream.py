"""The whole pipeline on the real stack: Kafka in, Triton and Redis in the middle, verdicts and DLQ out."""

from __future__ import annotations

import time
from pathlib import Path

from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient
from PIL import Image

from services.common.config import Settings
from services.common.kafka_io import ensure_topics
from services.common.photos.build import Manifest
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


def _plant(manifest: Manifest, folder: Path, originals: int, with_copies: int, seed: int) -> list[PhotoSample]:
    samples: list[PhotoSample] = []
    for n, record in enumerate(pick_photos(manifest, originals, seed)):
        uid = f"orig-{n:03d}"
        path = write_photo(manifest, record, folder, uid)
        samples.append(PhotoSample(uid, path, None))
        if n < with_copies:
            with Image.open(path) as img:
                image = img.convert("RGB")
            for family, transform in NEAR_DUPLICATES.items():
                cid = f"copy-{n:03d}-{family}"
                cpath = folder / f"{cid}.jpg"
                cpath.write_bytes(encode_jpeg(transform(image), 85))
                samples.append(PhotoSample(cid, cpath, uid))
    return samples


def test_near_duplicates_are_found_and_unrelated_photos_are_not(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    samples = _plant(photo_set, tmp_path, originals=16, with_copies=6, seed=11)
    originals = [s for s in samples if s.original is None]
    copies = [s for s in samples if s.original is not None]
    ensure_topics(settings.kafka)
    start_moderator(moderators, stack_env, tmp_path)
    publisher = UploadPublisher(settings.kafka)
    publisher.publish(event_for_file(s.path, s.upload_id) for s in originals)
    assert len(read_topic(settings, settings.kafka.topic_verdicts, len(originals))) >= len(originals)
    publisher.publish(event_for_file(s.path, s.upload_id) for s in copies)

    records = read_topic(settings, settings.kafka.topic_verdicts, len(samples))
    verdicts = {str(r["upload_id"]): r for r in records}
    assert set(verdicts) == {s.upload_id for s in samples}, moderators[0].log()[-3000:]
    family_of = {s.upload_id: s.original or s.upload_id for s in samples}
    for copy in copies:
        matches = [str(d["upload_id"]) for d in verdicts[copy.upload_id]["duplicate_of"]]  # type: ignore[union-attr]
        assert matches, f"{copy.upload_id} was not matched to anything"
        assert family_of[matches[0]] == copy.original, f"{copy.upload_id} matched {matches}"
    for original in originals:
        assert verdicts[original.upload_id]["duplicate_of"] == [], f"{original.upload_id} flagged as a duplicate"
        assert verdicts[original.upload_id]["model_version"] == served_version()


def test_bad_input_goes_to_the_dlq_and_the_stream_goes_on(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    good = [write_photo(photo_set, r, tmp_path, f"good-{i}") for i, r in enumerate(pick_photos(photo_set, 3, 5))]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:2000])
    not_image = tmp_path / "notes.jpg"
    not_image.write_bytes(b"these are meeting notes, not a JPEG\n" * 50)
    ensure_topics(settings.kafka)
    publisher = UploadPublisher(settings.kafka)
    publisher.publish([event_for_file(good[0], "good-0")])
    publisher.publish_raw("malformed", b'{"event_id": "x", "upload_id": ')
    publisher.publish([event_for_file(truncated, "bad-truncated"), event_for_file(not_image, "bad-notimage")])
    publisher.publish(event_for_file(p, p.stem) for p in good[1:])
    start_moderator(moderators, stack_env, tmp_path)

    verdicts = {str(r["upload_id"]) for r in read_topic(settings, settings.kafka.topic_verdicts, 3)}
    assert verdicts == {"good-0", "good-1", "good-2"}
    dead = read_topic(settings, settings.kafka.topic_dlq, 3, key_field="source_offset")
    kinds = {str(d["original_key"]): str(d["error_kind"]) for d in dead}
    assert kinds == {
        "malformed": "malformed_event",
        "bad-truncated": "corrupt_image",
        "bad-notimage": "unsupported_format",
    }
    assert all(d["detail"] for d in dead)


def test_killing_a_replica_mid_stream_loses_no_upload(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    records = pick_photos(photo_set, 24, 3)
    paths = [write_photo(photo_set, r, tmp_path, f"p{i}") for i, r in enumerate(records)]
    ids = [f"k{n:03d}" for n in range(96)]
    ensure_topics(settings.kafka)
    UploadPublisher(settings.kafka).publish(event_for_file(paths[n % len(paths)], uid) for n, uid in enumerate(ids))
    first = start_moderator(moderators, {**stack_env, "SIEVE_MODERATOR_BATCH_SIZE": "8"}, tmp_path)
    deadline = time.monotonic() + 180
    seen: set[str] = set()
    while time.monotonic() < deadline and len(seen) < 16:
        seen = {str(r["upload_id"]) for r in read_topic(settings, settings.kafka.topic_verdicts, 16, timeout_s=5)}
    assert len(seen) >= 16, first.log()[-3000:]
    first.kill()
    assert len(seen) < len(ids), "the replica finished before it could be killed mid-stream"

    second = start_moderator(moderators, stack_env, tmp_path)
    verdicts = {str(r["upload_id"]) for r in read_topic(settings, settings.kafka.topic_verdicts, len(ids))}
    assert verdicts == set(ids), second.log()[-3000:]
    assert second.terminate() == 0  # SIGTERM drains and commits

    admin = AdminClient(settings.kafka.client_config())
    committed = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(settings.kafka.consumer_group)])[
        settings.kafka.consumer_group
    ].result()
    total = sum(tp.offset for tp in committed.topic_partitions if tp.offset >= 0)
    assert total == len(ids)


def _members(admin: AdminClient, group: str) -> dict[str, set[int]]:
    desc = admin.describe_consumer_groups([group])[group].result()
    return {m.member_id: {tp.partition for tp in m.assignment.topic_partitions} for m in desc.members}


def test_two_replicas_split_partitions_and_see_each_others_images(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    ensure_topics(settings.kafka)
    start_moderator(moderators, stack_env, tmp_path)
    start_moderator(moderators, stack_env, tmp_path)
    admin = AdminClient(settings.kafka.client_config())
    deadline = time.monotonic() + 90
    members: dict[str, set[int]] = {}
    while time.monotonic() < deadline:
        members = _members(admin, settings.kafka.consumer_group)
        if len(members) == 2 and all(members.values()) and sum(map(len, members.values())) == settings.kafka.partitions:
            break
        time.sleep(1)
    assert len(members) == 2 and all(members.values()), members
    part_a, part_b = (min(p) for p in members.values())
    assert not set.intersection(*members.values())

    record = pick_photos(photo_set, 1, 21)[0]
    original = write_photo(photo_set, record, tmp_path, "shared-original")
    with Image.open(original) as img:
        copy_bytes = encode_jpeg(NEAR_DUPLICATES["crop90_jpeg50"](img.convert("RGB")), 85)
    copy = tmp_path / "shared-copy.jpg"
    copy.write_bytes(copy_bytes)

    publisher = UploadPublisher(settings.kafka)
    publisher.producer.producer.produce(
        settings.kafka.topic_uploads,
        key="shared-original",
        partition=part_a,
        value=event_for_file(original, "shared-original").model_dump_json().encode(),
    )
    publisher.producer.producer.flush(10)
    assert read_topic(settings, settings.kafka.topic_verdicts, 1)
    publisher.producer.producer.produce(
        settings.kafka.topic_uploads,
        key="shared-copy",
        partition=part_b,
        value=event_for_file(copy, "shared-copy").model_dump_json().encode(),
    )
    publisher.producer.producer.flush(10)
    verdicts = {str(r["upload_id"]): r for r in read_topic(settings, settings.kafka.topic_verdicts, 2)}
    matches = [d["upload_id"] for d in verdicts["shared-copy"]["duplicate_of"]]  # type: ignore[union-attr]
    assert matches == ["shared-original"], [m.log()[-2000:] for m in moderators]
