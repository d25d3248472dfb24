"""The keypoint channel shared through the real Redis: every replica finds every replica's uploads."""

from __future__ import annotations

import time

import pytest
import redis
from PIL import Image
from skimage import data as skdata

from services.common.config import Settings, VerificationSettings
from services.common.imaging import detail_view
from services.common.verification import FeatureStore, LocalFeatures, SharedKeypointIndex, Verifier


def _features(verifier: Verifier, name: str, turn: bool = False) -> LocalFeatures:
    img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    if turn:  # a copy turned 90° and cropped: the descriptor's cosine drops, the keypoints stay
        img = img.transpose(Image.Transpose.ROTATE_90).crop((30, 40, img.height - 20, img.width - 50))
    return verifier.extractor.extract(detail_view(img, 512))


@pytest.fixture()
def client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis.url.get_secret_value())


def _replica(client: redis.Redis, settings: Settings, verifier: Verifier, ttl: int = 3600) -> SharedKeypointIndex:
    return SharedKeypointIndex(FeatureStore(client, settings.redis.key_prefix, ttl), verifier.keypoint_index(), ttl)


def test_a_second_replica_finds_the_first_replicas_upload_by_its_keypoints(
    client: redis.Redis, settings: Settings
) -> None:
    verifier = Verifier(VerificationSettings())
    a, b = _replica(client, settings, verifier), _replica(client, settings, verifier)
    stored = {name: _features(verifier, name) for name in ("astronaut", "coffee", "rocket")}
    a.store.put_many(stored)
    a.add(stored)
    query = _features(verifier, "coffee", turn=True)
    assert verifier.keypoint_candidates(b.index, query, exclude=()) == []  # nothing replayed yet
    assert b.sync()
    assert len(b) == 3
    hits = verifier.keypoint_candidates(b.index, query, exclude=())
    assert hits and hits[0].upload_id == "coffee"
    assert b.sync() and len(b) == 3  # a replay is idempotent


def test_a_replica_started_later_replays_the_window_and_the_log_is_trimmed_with_it(
    client: redis.Redis, settings: Settings
) -> None:
    verifier = Verifier(VerificationSettings())
    a = _replica(client, settings, verifier, ttl=3600)
    a.store.put_many({"rocket": _features(verifier, "rocket")})
    fresh = _replica(client, settings, verifier)
    assert fresh.sync() and "rocket" in fresh.index
    assert client.xlen(a.store.log_key) == 1
    a.maintain(now=time.time() + 7200)  # two hours on: the entry left the window
    assert len(a) == 0 and client.xlen(a.store.log_key) == 0
    later = _replica(client, settings, verifier)
    assert later.sync() and len(later) == 0


def test_with_redis_unreachable_the_replica_keeps_searching_what_it_holds(settings: Settings) -> None:
    verifier = Verifier(VerificationSettings())
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    replica = _replica(dead, settings, verifier)
    replica.add({"astronaut": _features(verifier, "astronaut")})
    assert not replica.sync()
    replica.maintain()  # no raise
    hits = verifier.keypoint_candidates(replica.index, _features(verifier, "astronaut", turn=True), exclude=())
    assert [h.upload_id for h in hits] == ["astronaut"]
