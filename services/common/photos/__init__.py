"""Real photographs for tests and training, gathered reproducibly from Debian packages.

See :func:`build_photo_set`; ``python -m services.common.photos`` builds the default set.
"""

from services.common.photos.build import (
    DEFAULT_SOURCES,
    SOURCES,
    Manifest,
    PhotoRecord,
    build_photo_set,
    default_cache_root,
    default_photo_dir,
    load_photo_set,
    split_for,
)
from services.common.photos.rcc import RccError, RccStats, iter_rcc

__all__ = [
    "DEFAULT_SOURCES",
    "SOURCES",
    "Manifest",
    "PhotoRecord",
    "RccError",
    "RccStats",
    "build_photo_set",
    "default_cache_root",
    "default_photo_dir",
    "iter_rcc",
    "load_photo_set",
    "split_for",
]
