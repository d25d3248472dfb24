"""The newest Milvus write timestamp of a collection, shared by every replica through Redis.

Milvus's own Session consistency remembers the last write only inside one client process, so a replica would
not see another replica's rows in time. Strong consistency does, but makes every search wait for the server's
next time tick (20-40 ms) even when nothing was written. Publishing each acknowledged write's hybrid timestamp
here, and searching with that timestamp as the guarantee, gives every replica read-your-writes for all writes
acknowledged before its search, and a search waits only when such a write is younger than one tick.
"""

from __future__ import annotations

from typing import Protocol

import redis

from services.common.errors import TransientError

# Hybrid timestamps (physical ms << 18 | logical) exceed 2^53, where Lua numbers lose precision: compare the
# decimal strings by length, then lexically.
_ADVANCE = """
local cur = redis.call('GET', KEYS[1])
local new = ARGV[1]
if (not cur) or #new > #cur or (#new == #cur and new > cur) then
  redis.call('SET', KEYS[1], new)
  return new
end
return cur
"""


class WriteClock(Protocol):
    def advance(self, ts: int) -> None:
        """Records that a write with Milvus timestamp ``ts`` was acknowledged (the clock keeps the maximum)."""
        ...

    def read(self) -> int:
        """The newest acknowledged write's timestamp; 0 when none is known."""
        ...


class RedisWriteClock:
    def __init__(self, client: redis.Redis, key_prefix: str, collection: str) -> None:
        self.client = client
        self.key = f"{key_prefix}:milvus:{collection}:write_ts"
        self._advance = client.register_script(_ADVANCE)

    def advance(self, ts: int) -> None:
        if ts <= 0:
            return
        try:
            self._advance(keys=[self.key], args=[str(int(ts))])
        except redis.RedisError as exc:
            raise TransientError("redis", f"cannot publish the write timestamp of {self.key}: {exc}") from exc

    def read(self) -> int:
        try:
            value = self.client.get(self.key)
        except redis.RedisError as exc:
            raise TransientError("redis", f"cannot read the write timestamp of {self.key}: {exc}") from exc
        return int(value) if value else 0
