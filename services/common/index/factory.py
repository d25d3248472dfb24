"""Opens the recent-images index of one model version on the configured backend (SIEVE_INDEX_BACKEND)."""

from __future__ import annotations

import redis

from services.common.config import Settings
from services.common.index.base import RecentIndex
from services.common.index.faiss_redis import FaissRedisIndex
from services.common.index.redis_store import RedisIndexStore
from services.common.index.write_clock import RedisWriteClock


def open_recent_index(settings: Settings, client: redis.Redis, model_version: str, dim: int) -> RecentIndex:
    """FAISS in every replica kept in step through Redis (default), or one Milvus collection per version.

    Both are namespaced by the Redis key prefix, so deployments (and tests) sharing a server never meet.
    """
    cfg = settings.index
    if cfg.backend == "milvus":
        from services.common.index.milvus_index import MilvusRecentIndex, collection_name  # pymilvus: pandas

        prefix = settings.redis.key_prefix
        collection = collection_name(settings.milvus.collection_prefix, prefix, model_version)
        clock = RedisWriteClock(client, prefix, collection)
        return MilvusRecentIndex(settings.milvus, prefix, model_version, dim, cfg.retention_s, write_clock=clock)
    return FaissRedisIndex(
        client,
        settings.redis.key_prefix,
        model_version,
        dim,
        cfg.retention_s,
        ivf_from=cfg.ivf_from,
        nprobe=cfg.ivf_nprobe,
        snapshot_every=cfg.snapshot_every,
    )


def recent_index_dim(settings: Settings, client: redis.Redis, model_version: str) -> int | None:
    """The dimension of a version's index (None: it has none yet)."""
    if settings.index.backend == "milvus":
        from services.common.index.milvus_index import milvus_index_dim

        return milvus_index_dim(settings.milvus, settings.redis.key_prefix, model_version)
    return RedisIndexStore(client, settings.redis.key_prefix, model_version).dim()
