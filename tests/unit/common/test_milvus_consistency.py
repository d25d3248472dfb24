"""Which consistency each Milvus search asks for (the real server's side is in tests/integration).

Session must guarantee the newest write any replica published, fall back to Strong whenever that is unknown,
and never let a Redis outage stop writes or searches: a write's timestamp is published once Redis is back.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from pymilvus.client import ts_utils

from services.common.config import MilvusSettings
from services.common.errors import TransientError
from services.common.index.base import IndexEntry
from services.common.index.milvus_index import MilvusRecentIndex


class FakeClock:
    def __init__(self) -> None:
        self.ts = 0
        self.down = False

    def advance(self, ts: int) -> None:
        if self.down:
            raise TransientError("redis", "down")
        self.ts = max(self.ts, ts)

    def read(self) -> int:
        if self.down:
            raise TransientError("redis", "down")
        return self.ts


class FakeMilvus:
    """Records the search kwargs; an upsert stamps the collection like pymilvus does after a real one."""

    def __init__(self, first_ts: int) -> None:
        self.next_ts = first_ts
        self.searches: list[dict[str, Any]] = []

    def has_collection(self, name: str, timeout: float | None = None) -> bool:
        return True

    def describe_collection(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return {"fields": [{"name": "embedding", "params": {"dim": 4}}]}

    def load_collection(self, name: str, timeout: float | None = None) -> None:
        pass

    def upsert(self, name: str, rows: list[dict[str, Any]], timeout: float | None = None) -> dict[str, Any]:
        self.next_ts += 1000
        ts_utils.update_collection_ts(name, self.next_ts)
        return {"upsert_count": len(rows)}

    def delete(self, name: str, **kwargs: Any) -> None:
        pass

    def query(self, name: str, **kwargs: Any) -> list[dict[str, Any]]:
        return [{"count(*)": 1}]

    def search(self, name: str, **kwargs: Any) -> list[list[dict[str, Any]]]:
        self.searches.append(kwargs)
        return [[] for _ in kwargs["data"]]


def _index(settings: MilvusSettings, clock: FakeClock | None, milvus: FakeMilvus, ns: str) -> MilvusRecentIndex:
    return MilvusRecentIndex(settings, ns, "emb:1", 4, 3600, connect=lambda: milvus, write_clock=clock)


def _entry(uid: str) -> IndexEntry:
    return IndexEntry(uid, np.ones(4, np.float32), time.time())


def _asked(milvus: FakeMilvus) -> tuple[Any, Any]:
    last = milvus.searches[-1]
    return last["consistency_level"], last.get("guarantee_timestamp")


@pytest.fixture
def session() -> MilvusSettings:
    return MilvusSettings(consistency="Session")


def test_session_guarantees_the_newest_write_any_replica_published(session: MilvusSettings) -> None:
    clock, milvus = FakeClock(), FakeMilvus(10**17)
    writer, reader = _index(session, clock, milvus, "ns1"), _index(session, clock, milvus, "ns1")
    writer.add([_entry("a")])
    assert clock.ts == milvus.next_ts
    reader.search(np.ones((1, 4)), 3)
    assert _asked(milvus) == ("Customized", milvus.next_ts)


def test_nothing_known_or_redis_away_means_strong(session: MilvusSettings) -> None:
    clock, milvus = FakeClock(), FakeMilvus(2 * 10**17)
    reader = _index(session, clock, milvus, "ns2")
    reader.search(np.ones((1, 4)), 3)
    assert _asked(milvus) == ("Strong", None)
    clock.ts = 5
    clock.down = True
    reader.search(np.ones((1, 4)), 3)
    assert _asked(milvus) == ("Strong", None)


def test_a_write_during_a_redis_outage_is_published_when_redis_is_back(session: MilvusSettings) -> None:
    clock, milvus = FakeClock(), FakeMilvus(3 * 10**17)
    writer = _index(session, clock, milvus, "ns3")
    clock.down = True
    writer.add([_entry("a")])  # lands in Milvus; the outage must not stall the moderator
    written = milvus.next_ts
    assert clock.ts == 0
    writer.search(np.ones((1, 4)), 3)
    assert _asked(milvus) == ("Strong", None)
    clock.down = False
    writer.maintain()
    assert clock.ts == written
    writer.search(np.ones((1, 4)), 3)
    assert _asked(milvus) == ("Customized", written)


def test_a_replica_reads_its_own_writes_even_when_the_clock_lags(session: MilvusSettings) -> None:
    clock, milvus = FakeClock(), FakeMilvus(4 * 10**17)
    writer = _index(session, clock, milvus, "ns4")
    writer.add([_entry("a")])
    clock.ts = 1  # a lost and rewritten key, say
    writer.search(np.ones((1, 4)), 3)
    assert _asked(milvus) == ("Customized", milvus.next_ts)


def test_other_levels_pass_through_and_session_needs_a_clock() -> None:
    milvus = FakeMilvus(5 * 10**17)
    strong = _index(MilvusSettings(consistency="Strong"), FakeClock(), milvus, "ns5")
    strong.add([_entry("a")])
    strong.search(np.ones((1, 4)), 3)
    assert _asked(milvus) == ("Strong", None)
    with pytest.raises(ValueError, match="write clock"):
        _index(MilvusSettings(consistency="Session"), None, milvus, "ns5")
