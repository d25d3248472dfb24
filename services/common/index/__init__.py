"""The shared recent-images index: a local FAISS index per replica, kept in step through Redis."""

from services.common.index.base import IndexEntry, Neighbour, RecentIndex, VectorIndex
from services.common.index.factory import open_recent_index, recent_index_dim
from services.common.index.faiss_index import FaissVectorIndex
from services.common.index.redis_store import RedisIndexStore
from services.common.index.shared import SharedRecentIndex

__all__ = [
    "FaissVectorIndex",
    "IndexEntry",
    "Neighbour",
    "RecentIndex",
    "RedisIndexStore",
    "SharedRecentIndex",
    "VectorIndex",
    "open_recent_index",
    "recent_index_dim",
]
