"""The shared recent-images index: a local FAISS index per replica, kept in step through Redis."""

from services.common.index.base import IndexEntry, Neighbour, VectorIndex
from services.common.index.faiss_index import FaissVectorIndex
from services.common.index.redis_store import RedisIndexStore
from services.common.index.shared import SharedRecentIndex

__all__ = ["FaissVectorIndex", "IndexEntry", "Neighbour", "RedisIndexStore", "SharedRecentIndex", "VectorIndex"]
