"""Per-version thresholds that a promotion records in Redis, next to the admin's overrides.

A version the retraining job ships did not exist when the moderators were configured, so
SIEVE_DECISION_VERSION_THRESHOLDS cannot list it. The job fine-tunes against its parent's threshold and records
that threshold here when it promotes; moderators, the trainer and offline tools merge these entries over the
configured ones. Without an entry a new version would fall back to the global default, which belongs to no
embedding space in particular. Bank embedding thresholds are recorded the same way, in their own hash
(``kind="bank"``): without one a new version's banked images would only match at the 0.95 fallback.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

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


def overrides_key(prefix: str) -> str:
    """The admin's overridden DecisionSettings fields (JSON), written by the reviewer's admin API."""
    return f"{prefix}:config:thresholds"


@dataclass(frozen=True)
class Resolved:
    value: float
    source: str  # where the value came from, in words a user can look up


def card_threshold(cards: Path | None, model_version: str, field: str = "duplicate_threshold") -> float | None:
    """A threshold the version's model card records (``cards`` is the model's folder of numbered versions)."""
    if cards is None:
        return None
    card = cards / model_version.rsplit(":", 1)[-1] / "model_card.json"
    if not card.is_file():
        return None
    value = json.loads(card.read_text()).get(field)
    return float(value) if isinstance(value, int | float) else None


class ThresholdResolver:
    """The one answer to "which threshold applies to this version", for the moderator, the admin API, re-judging,
    ``sieve explain``, ``sieve dedup`` and evaluation.

    Duplicates: an admin override of ``duplicate_threshold``, else the threshold recorded when the version was
    promoted, else the configured per-version one (SIEVE_DECISION_VERSION_THRESHOLDS), else the version's model
    card (offline tools, which read model_repo/), else the global default. Banked images: the bank's own, else
    recorded, else configured (SIEVE_BANKS_EMBEDDING_THRESHOLDS), else the card's ``bank_embedding_threshold``,
    else the bank default. What lives in Redis is re-read at most every ``refresh_s``; when Redis is away the
    last values read stand.
    """

    def __init__(
        self,
        decision: DecisionSettings,
        banks: BankSettings,
        client: redis.Redis | None = None,
        prefix: str = "sieve",
        cards: Path | None = None,
        refresh_s: float = 5.0,
    ) -> None:
        self.configured = decision
        self.configured_banks = banks
        self.client = client
        self.prefix = prefix
        self.cards = cards
        self.refresh_s = refresh_s
        self.overrides: dict[str, float] = {}
        self.recorded: dict[str, float] = {}
        self.recorded_banks: dict[str, float] = {}
        self._read_at = float("-inf")

    def refresh(self, force: bool = False) -> bool:
        """Re-reads overrides and recorded thresholds; True when something changed."""
        if self.client is None or (not force and time.monotonic() - self._read_at < self.refresh_s):
            return False
        self._read_at = time.monotonic()
        try:
            raw = self.client.get(overrides_key(self.prefix))
        except redis.RedisError:
            return False
        before = (self.overrides, self.recorded, self.recorded_banks)
        self.overrides = json.loads(raw) if raw else {}
        self.recorded = recorded_thresholds(self.client, self.prefix)
        self.recorded_banks = recorded_thresholds(self.client, self.prefix, "bank")
        return before != (self.overrides, self.recorded, self.recorded_banks)

    @property
    def decision(self) -> DecisionSettings:
        """The configured decision settings with the admin's overrides and the recorded thresholds merged in."""
        self.refresh()
        return with_recorded(self.configured.model_copy(update=self.overrides), self.recorded)

    def duplicate(self, model_version: str, overrides: bool = True) -> Resolved:
        """``overrides=False``: the version's own threshold, as a promotion carries it over to a child."""
        self.refresh()
        if overrides and "duplicate_threshold" in self.overrides:
            return Resolved(float(self.overrides["duplicate_threshold"]), "admin override (reviewer API)")
        if model_version in self.recorded:
            return Resolved(self.recorded[model_version], f"recorded when {model_version} was promoted")
        if model_version in self.configured.version_thresholds:
            return Resolved(
                self.configured.version_thresholds[model_version], f"SIEVE_DECISION_VERSION_THRESHOLDS[{model_version}]"
            )
        card = card_threshold(self.cards, model_version)
        if card is not None:
            return Resolved(card, f"model_card.json of {model_version}")
        return Resolved(self.configured.duplicate_threshold, "SIEVE_DECISION_DUPLICATE_THRESHOLD")

    def decision_for(self, model_version: str) -> DecisionSettings:
        """The decision settings the moderator applies to an answer from this version."""
        return self.decision.model_copy(update={"duplicate_threshold": self.duplicate(model_version).value})

    def bank(self, model_version: str, own: float | None = None) -> Resolved:
        if own is not None:
            return Resolved(own, "the bank's own threshold")
        self.refresh()
        if model_version in self.recorded_banks:
            return Resolved(self.recorded_banks[model_version], f"recorded when {model_version} was promoted")
        configured = self.configured_banks.embedding_thresholds
        if model_version in configured:
            return Resolved(configured[model_version], f"SIEVE_BANKS_EMBEDDING_THRESHOLDS[{model_version}]")
        card = card_threshold(self.cards, model_version, "bank_embedding_threshold")
        if card is not None:
            return Resolved(card, f"model_card.json of {model_version}")
        return Resolved(self.configured_banks.embedding_threshold, "SIEVE_BANKS_EMBEDDING_THRESHOLD")

    def versions(self) -> list[str]:
        """Every version some threshold is known for (configured or recorded)."""
        self.refresh()
        known = {*self.configured.version_thresholds, *self.recorded, *self.recorded_banks}
        known |= set(self.configured_banks.embedding_thresholds)
        return sorted(known)

    def effective(self, model_version: str) -> dict[str, Any]:
        duplicate, bank = self.duplicate(model_version), self.bank(model_version)
        return {
            "duplicate_threshold": duplicate.value,
            "duplicate_threshold_source": duplicate.source,
            "bank_embedding_threshold": bank.value,
            "bank_embedding_threshold_source": bank.source,
        }
