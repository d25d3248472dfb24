"""The shared recent-images index against the real Redis server."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from services.common.config import Settings
from services.common.index import FaissRedisIndex, IndexEntry
from services.common.index.base import Snapshot
from services.common.index.redis_store import RedisIndexStore
from services.common.stack import LocalStack


def _vec(seed: int, dim: int = 32) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture()
def client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis.url.get_secret_value())


def _replica(client: redis.Redis, settings: Settings, version: str = "emb:1") -> FaissRedisIndex:
    return FaissRedisIndex(client, settings.redis.key_prefix, version, 32, retention_s=3600)


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
    assert a.store.stream_length() <= 1  # trimmed to the snapshot point
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


def test_snapshot_in_many_blocks_round_trips_and_switches_whole(client: redis.Redis, settings: Settings) -> None:
    # 32-d float32 is 128 bytes a row: 1000 bytes per block gives 7 rows, so 50 entries take 8 blocks.
    store = RedisIndexStore(client, settings.redis.key_prefix, "emb:blocks", block_bytes=1000)
    now = time.time()
    first = [IndexEntry(f"b{i}", _vec(i), now + i) for i in range(50)]
    store.write_snapshot(Snapshot(entries=first, stream_id="5-0"))
    loaded = store.load_snapshot()
    assert loaded is not None and loaded.stream_id == "5-0"
    assert [e.upload_id for e in loaded.entries] == [e.upload_id for e in first]
    assert np.allclose(np.stack([e.vector for e in loaded.entries]), np.stack([e.vector for e in first]))
    assert [e.added_at for e in loaded.entries] == [e.added_at for e in first]
    old_generation = client.get(store.current_key)

    store.write_snapshot(Snapshot(entries=first[:3], stream_id="9-0"))
    reloaded = store.load_snapshot()
    assert reloaded is not None and [e.upload_id for e in reloaded.entries] == ["b0", "b1", "b2"]
    assert store.snapshot_id() == "9-0"
    # The retired generation stays readable for a grace period, then expires.
    assert old_generation is not None
    old_key = f"{store.snapshot_key}:gen:{old_generation.decode()}"
    assert 0 < client.ttl(old_key) <= 120
    store.delete_snapshot()
    assert store.load_snapshot() is None


def test_a_writer_that_dies_mid_snapshot_leaves_the_current_one(client: redis.Redis, settings: Settings) -> None:
    store = RedisIndexStore(client, settings.redis.key_prefix, "emb:crash", block_bytes=1000)
    store.write_snapshot(Snapshot(entries=[IndexEntry("keep", _vec(1), time.time())], stream_id="1-0"))

    class Dies(RuntimeError):
        pass

    calls = 0
    real_hset = client.hset

    def failing_hset(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Dies
        return real_hset(*args, **kwargs)  # type: ignore[arg-type]

    client.hset = failing_hset  # type: ignore[method-assign]
    try:
        with pytest.raises(Dies):
            entries = [IndexEntry(f"n{i}", _vec(i), time.time()) for i in range(40)]
            store.write_snapshot(Snapshot(entries, "7-0"))
    finally:
        del client.hset
    loaded = store.load_snapshot()
    assert loaded is not None and [e.upload_id for e in loaded.entries] == ["keep"]
    assert store.snapshot_id() == "1-0"
    leftovers = [k for k in client.scan_iter(f"{store.snapshot_key}:gen:7-0.*")]
    assert leftovers and all(client.ttl(k) > 0 for k in leftovers)


def test_a_large_window_turns_ivf_in_the_background_and_rebuilds_keep_the_setting(
    client: redis.Redis, settings: Settings
) -> None:
    replica = FaissRedisIndex(client, settings.redis.key_prefix, "emb:ivf", 32, 3600, ivf_from=300, nprobe=8)
    now = time.time()
    replica.add([IndexEntry(f"v{i}", _vec(i), now) for i in range(400)])
    thread = replica.local.reindex_in_background()
    assert thread is not None
    thread.join(60)
    assert replica.local.kind.startswith("IVF")
    assert replica.search(_vec(123)[None], 1)[0][0].upload_id == "v123"
    # A replica that starts later loads the same window and turns IVF on its own schedule.
    late = FaissRedisIndex(client, settings.redis.key_prefix, "emb:ivf", 32, 3600, ivf_from=300, nprobe=8)
    assert late.sync() and len(late) == 400 and late.local.ivf_from == 300
    assert late.local.reindex() and late.search(_vec(7)[None], 1)[0][0].upload_id == "v7"
