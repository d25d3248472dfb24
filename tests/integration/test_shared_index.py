"""The shared recent-images index against the real Redis server."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from services.common.config import Settings
from services.common.index import IndexEntry, SharedRecentIndex
from services.common.stack import LocalStack


def _vec(seed: int, dim: int = 32) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture()
def client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis.url.get_secret_value())


def _replica(client: redis.Redis, settings: Settings, version: str = "emb:1") -> SharedRecentIndex:
    return SharedRecentIndex(client, settings.redis.key_prefix, version, 32, retention_s=3600)


def test_second_replica_sees_first_replicas_additions(client: redis.Redis, settings: Settings) -> None:
    a, b = _replica(client, settings), _replica(client, settings)
    a.add([IndexEntry("x1", _vec(1), time.time())])
    assert b.sync()
    hits = b.search(_vec(1)[None], 1)[0]
    assert [h.upload_id for h in hits] == ["x1"]


def test_snapshot_plus_stream_tail_rebuilds_the_index(client: redis.Redis, settings: Settings) -> None:
    a = _replica(client, settings)
    a.add([IndexEntry(f"s{i}", _vec(i), time.time()) for i in range(20)])
    assert a.compact() == 20
    assert client.xlen(a.store.stream_key) <= 1  # trimmed to the snapshot point
    a.add([IndexEntry("tail", _vec(99), time.time())])
    fresh = _replica(client, settings)
    fresh.sync()
    assert len(fresh) == 21
    assert fresh.search(_vec(99)[None], 1)[0][0].upload_id == "tail"


def test_compaction_evicts_entries_past_retention(client: redis.Redis, settings: Settings) -> None:
    a = _replica(client, settings)
    now = time.time()
    a.add([IndexEntry("old", _vec(1), now - 7200), IndexEntry("new", _vec(2), now)])
    assert a.compact(now=now) == 1
    fresh = _replica(client, settings)
    fresh.sync()
    assert {h.upload_id for h in fresh.search(_vec(1)[None], 5)[0]} == {"new"}


def test_versions_never_share_an_index(client: redis.Redis, settings: Settings) -> None:
    v1 = _replica(client, settings, "emb:1")
    v1.add([IndexEntry("only-v1", _vec(5), time.time())])
    v2 = _replica(client, settings, "emb:2")
    v2.sync()
    assert len(v2) == 0


def test_redis_outage_buffers_additions_and_catches_up(stack: LocalStack, settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis.url.get_secret_value(), socket_timeout=1, socket_connect_timeout=1)
    a = _replica(client, settings)
    a.add([IndexEntry("before", _vec(1), time.time())])
    stack.redis.stop()
    try:
        a.add([IndexEntry("during", _vec(2), time.time())])  # must not raise
        assert not a.redis_ok
        assert [h.upload_id for h in a.search(_vec(2)[None], 1)[0]] == ["during"]
        assert len(a.pending) == 1
    finally:
        stack.redis.restart(stack.log_dir, 30)
    assert a.sync()
    assert not a.pending
    other = _replica(redis.Redis.from_url(settings.redis.url.get_secret_value()), settings)
    other.sync()
    assert {"before", "during"} <= {h.upload_id for h in other.search(_vec(2)[None], 5)[0]}


def test_replica_behind_a_compaction_rebuilds_from_the_snapshot(client: redis.Redis, settings: Settings) -> None:
    behind, compactor = _replica(client, settings), _replica(client, settings)
    behind.add([IndexEntry("first", _vec(1), time.time())])
    compactor.add([IndexEntry(f"c{i}", _vec(10 + i), time.time()) for i in range(5)])
    assert compactor.compact() == 6  # trims the stream past where `behind` stands
    compactor.add([IndexEntry("after", _vec(50), time.time())])
    assert behind.sync()
    assert behind.rebuilds == 1
    assert {h.upload_id for h in behind.search(_vec(12)[None], 1)[0]} == {"c2"}
    assert len(behind) == 7
    assert behind.sync() and behind.rebuilds == 1  # caught up: no second rebuild
