"""Per-version thresholds that a promotion records in Redis, next to the admin's overrides.

A version the retraining job ships did not exist when the moderators were configured, so
SIEVE_DECISION_VERSION_THRESHOLDS cannot list it. The job fine-tunes against its parent's threshold and records
that threshold here when it promotes; moderators, the trainer and offline tools merge these entries over the
configured ones. Without an entry a new version would fall back to the global default, which belongs to no
embedding space in particular. Bank embedding thresholds are recorded the same way, in their own hash
(``kind="bank"``): without one a new version's banked images would only match at the 0.95 fallback.
"""

from __future__ import annotations

import logging
import time
from typing import Literal, cast

import redis

from services.common.config import BankSettings, DecisionSettings

Kind = Literal["duplicate", "bank"]

log = logging.getLogger(__name__)


def version_thresholds_key(prefix: str, kind: Kind = "duplicate") -> str:
    return f"{prefix}:config:version_thresholds" if kind == "duplicate" else f"{prefix}:config:bank_thresholds"


def recorded_thresholds(client: redis.Redis, prefix: str, kind: Kind = "duplicate") -> dict[str, float]:
    """What promotions recorded; {} when nothing was recorded or Redis is unreachable (configured values stand)."""
    key = version_thresholds_key(prefix, kind)
    try:
        raw = cast(dict[bytes, bytes], client.hgetall(key))
    except redis.RedisError:
        log.warning("could not read recorded %s thresholds; using the configured ones", kind)
        return {}
    recorded: dict[str, float] = {}
    for version, value in raw.items():
        try:
            recorded[version.decode()] = float(value)
        except ValueError:
            log.error("ignoring malformed threshold %r for %r in %s", value, version, key)
    return recorded


def record_threshold(
    client: redis.Redis, prefix: str, model_version: str, threshold: float, kind: Kind = "duplicate"
) -> None:
    """One field of a hash per version: two promotions never overwrite each other's entry."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"a cosine threshold must be in (0, 1], not {threshold}")
    client.hset(version_thresholds_key(prefix, kind), model_version, repr(float(threshold)))


def forget_threshold(client: redis.Redis, prefix: str, model_version: str) -> None:
    """For a version whose promotion was undone: its number may be reused by a different model."""
    client.hdel(version_thresholds_key(prefix, "duplicate"), model_version)
    client.hdel(version_thresholds_key(prefix, "bank"), model_version)


def with_recorded(decision: DecisionSettings, recorded: dict[str, float]) -> DecisionSettings:
    """The decision settings with recorded thresholds merged over the configured per-version ones."""
    if not recorded:
        return decision
    return decision.model_copy(update={"version_thresholds": {**decision.version_thresholds, **recorded}})


def with_recorded_banks(banks: BankSettings, recorded: dict[str, float]) -> BankSettings:
    """The bank settings with recorded per-version embedding thresholds merged over the configured ones."""
    if not recorded:
        return banks
    return banks.model_copy(update={"embedding_thresholds": {**banks.embedding_thresholds, **recorded}})


class RecordedBankThresholds:
    """The configured bank thresholds with what promotions recorded merged over them, re-read at most every
    ``refresh_s`` so that every matcher (moderator, re-judging, the match API) sees a new version's threshold
    soon after it is promoted, without a read per match."""

    def __init__(self, banks: BankSettings, client: redis.Redis | None, prefix: str, refresh_s: float = 5.0) -> None:
        self.configured = banks
        self.client = client
        self.prefix = prefix
        self.refresh_s = refresh_s
        self._merged = banks
        self._read_at = float("-inf")

    def settings(self) -> BankSettings:
        if self.client is not None and time.monotonic() - self._read_at >= self.refresh_s:
            self._read_at = time.monotonic()
            self._merged = with_recorded_banks(self.configured, recorded_thresholds(self.client, self.prefix, "bank"))
        return self._merged
