"""Hash banks and exact re-uploads: decided from hashes in Redis, without the model."""

from __future__ import annotations

from pathlib import Path

import redis

from services.common.banks import HashBankStore
from services.common.banks.images import image_signals
from services.common.config import Settings
from services.common.kafka_io import ensure_topics
from services.common.photos.build import Manifest
from services.common.uploads import UploadPublisher, event_for_file
from tests.e2e.conftest import ModeratorProcess, pick_photos, read_topic, start_moderator, write_photo


def test_bank_match_blocks_and_exact_reupload_skips_the_model(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    banned, original = (
        write_photo(photo_set, r, tmp_path, f"f{i}") for i, r in enumerate(pick_photos(photo_set, 2, 9))
    )
    banks = HashBankStore(redis.Redis.from_url(settings.redis.url.get_secret_value()), settings.redis.key_prefix)
    banks.create("known-bad", "test bank")
    banks.add_hashes("known-bad", [(s.kind, s.value) for s in image_signals(banned.read_bytes(), settings)])
    ensure_topics(settings.kafka)
    publisher = UploadPublisher(settings.kafka)
    publisher.publish([event_for_file(banned, "banned-1"), event_for_file(original, "first")])
    start_moderator(moderators, stack_env, tmp_path)
    assert len({r["upload_id"] for r in read_topic(settings, settings.kafka.topic_verdicts, 2)}) == 2

    publisher.publish([event_for_file(original, "again")])
    banks.set_enabled("known-bad", False)
    publisher.publish([event_for_file(banned, "banned-2")])
    verdicts = {str(r["upload_id"]): r for r in read_topic(settings, settings.kafka.topic_verdicts, 4)}

    assert verdicts["banned-1"]["action"] == "block"
    assert verdicts["banned-1"]["reasons"] == ["bank_match:known-bad"]
    assert verdicts["first"]["action"] == "allow"
    again = verdicts["again"]
    assert again["duplicate_of"] == [{"upload_id": "first", "score": 1.0}]
    assert again["reasons"] == ["exact_hash_match:sha256:first"]
    assert "infer_ms" not in again["timings"]  # the model was skipped
    assert again["model_version"] == verdicts["first"]["model_version"]
    # A disabled bank no longer blocks.
    assert verdicts["banned-2"]["action"] != "block"
    assert not any(str(r).startswith("bank_match") for r in verdicts["banned-2"]["reasons"])  # type: ignore[union-attr]
