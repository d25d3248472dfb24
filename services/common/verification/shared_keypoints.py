"""Every replica's keypoint index holds every recent upload's keypoints, replayed from the features log.

Like the recent-images index: local first (the replica's own uploads are searchable at once), the log for the
others'. Redis unreachable: searches go on over what is held, and the replay catches up later.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import redis

from services.common.verification.features import LocalFeatures
from services.common.verification.keypoint_index import KeypointIndex
from services.common.verification.store import FeatureStore

log = logging.getLogger(__name__)


class SharedKeypointIndex:
    def __init__(self, store: FeatureStore, index: KeypointIndex, retention_s: int, batch: int = 500) -> None:
        self.store = store
        self.index = index
        self.retention_s = retention_s
        self.batch = batch
        self.stream_id = "0-0"
        self.redis_ok = True
        self._lock = threading.Lock()  # one replay at a time

    def __len__(self) -> int:
        return len(self.index)

    def sync(self) -> bool:
        """Adds what other replicas logged since the last call; False while Redis is unreachable."""
        cutoff = time.time() - self.retention_s
        with self._lock:
            try:
                while True:
                    logged, last = self.store.read_log(self.stream_id, self.batch)
                    wanted = [u for u, at in logged if at >= cutoff and u not in self.index]
                    found = self.store.get_many(wanted)
                    at_of = dict(logged)
                    for upload_id in wanted:
                        if upload_id in found:
                            self.index.add(upload_id, found[upload_id], at_of[upload_id])
                    self.stream_id = last
                    if len(logged) < self.batch:
                        break
            except redis.RedisError as exc:
                if self.redis_ok:
                    log.warning("keypoint index: features log unreachable (%s); serving what it holds", exc)
                self.redis_ok = False
                return False
        self.redis_ok = True
        return True

    def add(self, features: dict[str, LocalFeatures], now: float | None = None) -> None:
        """This replica's own uploads, searchable before the log has them."""
        at = time.time() if now is None else now
        for upload_id, feats in features.items():
            self.index.add(upload_id, feats, at)

    def maintain(self, now: float | None = None) -> None:
        """Drops what left the retention window, here and in the log."""
        cutoff = (time.time() if now is None else now) - self.retention_s
        self.index.evict_older_than(cutoff)
        with contextlib.suppress(redis.RedisError):
            self.store.trim_log(cutoff)
