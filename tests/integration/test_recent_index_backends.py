"""The recent-images index contract, run against both backends on real servers (Redis; Milvus standalone).

Whatever backs the index, replicas must find each other's uploads at once, an upload never matches itself,
re-adding an upload id overwrites it, nothing past the retention window matches, versions never mix, and a
backfill replaces a version's whole index.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import redis

from services.common.config import Settings
from services.common.errors import TransientError
from services.common.index import IndexEntry, RecentIndex, open_recent_index

Open = Callable[..., RecentIndex]


def _vec(seed: int, dim: int = 32) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture(params=["faiss", "milvus"])
def open_index(request: pytest.FixtureRequest, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Open:
    """A factory of replicas' handles on one backend, each with its own client like separate processes."""
    backend = str(request.param)
    if backend == "milvus":
        monkeypatch.setenv("SIEVE_MILVUS_URI", request.getfixturevalue("milvus_uri"))
    monkeypatch.setenv("SIEVE_INDEX_BACKEND", backend)
    fresh = Settings()

    def replica(version: str = "emb:1", dim: int = 32, retention_s: int | None = None) -> RecentIndex:
        s = (
            fresh
            if retention_s is None
            else fresh.model_copy(update={"index": fresh.index.model_copy(update={"retention_s": retention_s})})
        )
        client = redis.Redis.from_url(s.redis.url.get_secret_value())
        return open_recent_index(s, client, version, dim)

    return replica


def test_replicas_find_each_others_uploads_at_once(open_index: Open) -> None:
    a, b = open_index(), open_index()
    a.add([IndexEntry("x1", _vec(1), time.time()), IndexEntry("x2", _vec(2), time.time())])
    assert b.sync()
    hits = b.search(np.stack([_vec(1), _vec(2)]), 1)
    assert [h[0].upload_id for h in hits] == ["x1", "x2"]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-4)


def test_each_upload_is_visible_to_another_replica_the_moment_it_is_added(open_index: Open) -> None:
    """No pause between one replica's add and another's search (Milvus Session: the shared write clock; without
    it, a search right after an insert on another client misses it most of the time)."""
    from services.common.index.milvus_index import MilvusRecentIndex

    a, b = open_index(), open_index()
    for i in range(15):
        a.add([IndexEntry(f"n{i}", _vec(100 + i), time.time())])
        b.sync()
        if isinstance(a, MilvusRecentIndex) and isinstance(b, MilvusRecentIndex):
            # Visible because the other replica's search waits for this very write, through the shared clock
            # (a broken clock would fall back to Strong, or guarantee an older write, and this would fail).
            assert b._read_consistency().get("guarantee_timestamp", 0) >= a._own_write_ts > 0
        hits = b.search(_vec(100 + i)[None], 1)[0]
        assert [h.upload_id for h in hits] == [f"n{i}"], f"upload {i} not visible to the other replica"


def test_milvus_session_reads_survive_a_lost_write_clock(
    settings: Settings, milvus_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key gone (Redis flushed) or Redis unreachable: searches fall back to Strong and still see every row."""
    from services.common.index.milvus_index import MilvusRecentIndex, collection_name
    from services.common.index.write_clock import RedisWriteClock
    from services.common.stack.process import free_port

    monkeypatch.setenv("SIEVE_MILVUS_URI", milvus_uri)
    cfg = Settings().milvus
    assert cfg.consistency == "Session"
    prefix = settings.redis.key_prefix
    name = collection_name(cfg.collection_prefix, prefix, "emb:clock")
    live = redis.Redis.from_url(settings.redis.url.get_secret_value())
    writer = MilvusRecentIndex(cfg, prefix, "emb:clock", 32, 3600, write_clock=RedisWriteClock(live, prefix, name))
    writer.add([IndexEntry("w0", _vec(1), time.time())])
    clock = RedisWriteClock(live, prefix, name)
    assert clock.read() > 0
    live.delete(clock.key)
    writer.add([IndexEntry("w1", _vec(2), time.time())])
    assert clock.read() > 0  # the next write publishes its timestamp again
    live.delete(clock.key)  # and now the key is lost after the last write: no replica knows a write timestamp
    dead = RedisWriteClock(redis.Redis(port=free_port(), socket_connect_timeout=1), prefix, name)
    for reader_clock in (RedisWriteClock(live, prefix, name), dead):
        reader = MilvusRecentIndex(cfg, prefix, "emb:clock", 32, 3600, write_clock=reader_clock)
        assert reader._read_consistency() == {"consistency_level": "Strong"}  # the fallback, not a stale read
        found = reader.search(np.stack([_vec(1), _vec(2)]), 1)
        assert [[h.upload_id for h in row] for row in found] == [["w0"], ["w1"]]


def test_an_upload_never_matches_itself_and_top_k_is_kept(open_index: Open) -> None:
    a = open_index()
    a.add([IndexEntry(f"u{i}", _vec(i), time.time()) for i in range(10)])
    a.sync()
    hits = a.search(_vec(3)[None], 4, exclude=["u3"])[0]
    assert len(hits) == 4 and "u3" not in {h.upload_id for h in hits}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_both_backends_rank_neighbours_alike(open_index: Open) -> None:
    """Same entries, same queries: the same top-5 ids as exact search (HNSW is exact at this size)."""
    base = np.stack([_vec(i, 64) for i in range(300)])
    a = open_index("emb:rank", 64)
    a.add([IndexEntry(f"r{i}", base[i], time.time()) for i in range(300)])
    a.sync()
    queries = np.stack([base[i] + 0.3 * _vec(1000 + i, 64) for i in range(20)])
    exact = np.argsort(-(queries @ base.T), axis=1)[:, :5]
    found = a.search(queries, 5)
    assert [[h.upload_id for h in row] for row in found] == [[f"r{j}" for j in row] for row in exact]


def test_re_adding_an_upload_keeps_one_entry(open_index: Open) -> None:
    """Redelivery re-adds an upload: one entry stays (FAISS keeps the first, Milvus upserts the last)."""
    a = open_index()
    a.add([IndexEntry("same", _vec(1), time.time()), IndexEntry("other", _vec(3), time.time())])
    a.add([IndexEntry("same", _vec(1), time.time())])
    a.sync()
    assert [h.upload_id for h in a.search(_vec(1)[None], 5)[0]] == ["same", "other"]
    assert sorted(e.upload_id for e in a.entries()) == ["other", "same"]


def test_nothing_past_the_retention_window_matches(open_index: Open) -> None:
    a = open_index(retention_s=3600)
    now = time.time()
    a.add([IndexEntry("old", _vec(1), now - 7200), IndexEntry("new", _vec(2), now)])
    a.maintain()
    a.sync()
    assert {h.upload_id for h in a.search(_vec(1)[None], 5)[0]} == {"new"}
    assert [e.upload_id for e in a.entries()] == ["new"]


def test_another_replica_returns_the_stored_vectors_of_uploads_in_the_window(open_index: Open) -> None:
    """The second pass needs the cosine of a candidate the index did not rank: its vector, by upload id."""
    a, b = open_index(retention_s=3600), open_index(retention_s=3600)
    now = time.time()
    a.add([IndexEntry("v1", _vec(1), now), IndexEntry("v2", _vec(2), now), IndexEntry("gone", _vec(3), now - 7200)])
    assert b.sync()
    found = b.vectors(["v2", "v1", "gone", "never-added"])
    assert set(found) == {"v1", "v2"}
    assert float(np.dot(found["v1"], _vec(1))) == pytest.approx(1.0, abs=1e-4)
    assert float(np.dot(found["v2"], _vec(1))) == pytest.approx(float(np.dot(_vec(2), _vec(1))), abs=1e-4)
    assert b.vectors([]) == {}
    assert open_index("emb:other").vectors(["v1"]) == {}  # another version's index holds none of them


def test_model_versions_never_share_an_index(open_index: Open) -> None:
    v1, v2 = open_index("emb:1", 32), open_index("emb:2", 16)
    v1.add([IndexEntry("a", _vec(1), time.time())])
    v2.add([IndexEntry("b", _vec(2, 16), time.time())])
    v1.sync()
    v2.sync()
    assert [h.upload_id for h in v1.search(_vec(1)[None], 5)[0]] == ["a"]
    assert [h.upload_id for h in v2.search(_vec(2, 16)[None], 5)[0]] == ["b"]


def test_backfill_replaces_a_versions_whole_index(open_index: Open) -> None:
    stale = open_index("emb:9")
    stale.add([IndexEntry("stale", _vec(5), time.time())])  # a failed earlier attempt left this
    now = time.time()
    open_index("emb:9").replace([IndexEntry(f"b{i}", _vec(i), now) for i in range(50)])
    reader = open_index("emb:9")
    reader.sync()
    assert {e.upload_id for e in reader.entries()} == {f"b{i}" for i in range(50)}
    assert reader.search(_vec(7)[None], 1)[0][0].upload_id == "b7"


def test_an_unreachable_milvus_is_a_transient_error(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The moderator pauses and retries on TransientError; a dead endpoint must surface as one, quickly."""
    from pymilvus import MilvusClient

    from services.common.index.milvus_index import MilvusRecentIndex
    from services.common.index.write_clock import RedisWriteClock
    from services.common.stack.process import free_port

    cfg = settings.milvus.model_copy(update={"uri": f"http://127.0.0.1:{free_port()}", "timeout_s": 2.0})
    clock = RedisWriteClock(redis.Redis.from_url(settings.redis.url.get_secret_value()), "ns", "c")
    index = MilvusRecentIndex(cfg, "ns", "emb:1", 32, 3600, write_clock=clock)
    began = time.monotonic()
    with pytest.raises(TransientError) as raised:
        index.search(_vec(1)[None], 5)
    assert raised.value.dependency == "milvus"
    assert time.monotonic() - began < 30
    assert not index.sync()
    assert MilvusClient is not None
