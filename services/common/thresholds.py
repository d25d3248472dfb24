"""Per-version duplicate thresholds that a promotion records in Redis, next to the admin's overrides.

A version the retraining job ships did not exist when the moderators were configured, so
SIEVE_DECISION_VERSION_THRESHOLDS cannot list it. The job fine-tunes against its parent's threshold and records
that threshold here when it promotes; moderators, the trainer and offline tools merge these entries over the
configured ones. Without an entry a new version would fall back to the global default, which belongs to no
embedding space in particular.
"""

from __future__ import annotations

import logging
from typing import cast

import redis

from services.common.config import DecisionSettings

log = logging.getLogger(__name__)


def version_thresholds_key(prefix: str) -> str:
    return f"{prefix}:config:version_thresholds"


def recorded_thresholds(client: redis.Redis, prefix: str) -> dict[str, float]:
    """What promotions recorded; {} when nothing was recorded or Redis is unreachable (configured values stand)."""
    try:
        raw = cast(dict[bytes, bytes], client.hgetall(version_thresholds_key(prefix)))
    except redis.RedisError:
        log.warning("could not read recorded version thresholds; using the configured ones")
        return {}
    recorded: dict[str, float] = {}
    for version, value in raw.items():
        try:
            recorded[version.decode()] = float(value)
        except ValueError:
            log.error("ignoring malformed threshold %r for %r in %s", value, version, version_thresholds_key(prefix))
    return recorded


def record_threshold(client: redis.Redis, prefix: str, model_version: str, threshold: float) -> None:
    """One field of a hash per version: two promotions never overwrite each other's entry."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"a cosine threshold must be in (0, 1], not {threshold}")
    client.hset(version_thresholds_key(prefix), model_version, repr(float(threshold)))


def forget_threshold(client: redis.Redis, prefix: str, model_version: str) -> None:
    """For a version whose promotion was undone: its number may be reused by a different model."""
    client.hdel(version_thresholds_key(prefix), model_version)


def with_recorded(decision: DecisionSettings, recorded: dict[str, float]) -> DecisionSettings:
    """The decision settings with recorded thresholds merged over the configured per-version ones."""
    if not recorded:
        return decision
    return decision.model_copy(update={"version_thresholds": {**decision.version_thresholds, **recorded}})
