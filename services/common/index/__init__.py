"""The shared recent-images index: a local FAISS index per replica, kept in step through Redis."""

from services.common.index.base import IndexEntry, Neighbour, RecentIndex, VectorIndex
from services.common.index.factory import open_recent_index, recent_index_dim
from services.common.index.faiss_index import FaissVectorIndex
from services.common.index.faiss_redis import FaissRedisIndex
from services.common.index.redis_store import RedisIndexStore

__all__ = [
    "FaissRedisIndex",
    "FaissVectorIndex",
    "IndexEntry",
    "Neighbour",
    "RecentIndex",
    "RedisIndexStore",
    "VectorIndex",
    "open_recent_index",
    "recent_index_dim",
]
