"""Admin-only state in Redis: decision-threshold overrides, hash-bank names, model-promotion requests.

The reviewer service only stores these; the moderator reads the thresholds key and the bank names, and the
trainer reads the promotion requests. Formats (``<prefix>`` is SIEVE_REDIS_KEY_PREFIX):

- ``<prefix>:config:thresholds``        string  JSON of the overridden DecisionSettings fields only
- hash banks: kept by ``services.common.banks.HashBankStore`` (the same store the moderator matches against)
- promotion requests and their state: kept by ``services.common.promotions.PromotionLedger`` (the trainer
  consumes the stream and records each request's outcome there)
"""

from __future__ import annotations

import json
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common.banks import Bank, HashBankStore
from services.common.config import DecisionSettings
from services.common.promotions import PromotionLedger
from services.reviewer.labels import AuditLog

BANK_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class ThresholdOverrides(BaseModel):
    """Fields left out keep the moderator's configured value."""

    model_config = ConfigDict(extra="forbid")

    duplicate_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    review_margin: float | None = Field(default=None, ge=0.0, le=0.5)
    flag_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    flag_review_low: float | None = Field(default=None, ge=0.0, le=1.0)


class EffectiveThresholds(BaseModel):
    duplicate_threshold: float
    review_margin: float
    flag_threshold: float
    flag_review_low: float

    @model_validator(mode="after")
    def _band_is_ordered(self) -> EffectiveThresholds:
        if self.flag_review_low >= self.flag_threshold:
            raise ValueError("flag_review_low must be below flag_threshold")
        return self


class BankSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(default="", max_length=500)
    enabled: bool = True


class BankHash(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["sha256", "phash"]
    value: str = Field(pattern=r"^[0-9a-f]{16,64}$")


class BankHashes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hashes: list[BankHash] = Field(min_length=1, max_length=10_000)


class PromotionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="sieve_embedder", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    version: str = Field(pattern=r"^[0-9]{1,9}$")
    reason: str = Field(default="", max_length=1000)


class AdminStore:
    def __init__(self, client: redis.Redis, key_prefix: str, decision: DecisionSettings, audit: AuditLog) -> None:
        self.client = client
        self.decision = decision
        self.audit = audit
        self.thresholds_key = f"{key_prefix}:config:thresholds"
        self.bank_store = HashBankStore(client, key_prefix)
        self.ledger = PromotionLedger(client, key_prefix)

    def _overrides(self) -> ThresholdOverrides:
        raw = self.client.get(self.thresholds_key)
        return ThresholdOverrides.model_validate_json(raw) if raw else ThresholdOverrides()

    def thresholds(self) -> dict[str, Any]:
        overrides = self._overrides().model_dump(exclude_none=True)
        base = {f: getattr(self.decision, f) for f in EffectiveThresholds.model_fields}
        return {"key": self.thresholds_key, "overrides": overrides, "effective": {**base, **overrides}}

    def set_thresholds(self, overrides: ThresholdOverrides, actor: str) -> dict[str, Any]:
        """Replaces the overrides; raises ValueError when the result would be inconsistent."""
        values = overrides.model_dump(exclude_none=True)
        base = {f: getattr(self.decision, f) for f in EffectiveThresholds.model_fields}
        EffectiveThresholds.model_validate({**base, **values})
        before = self._overrides().model_dump(exclude_none=True)
        self.client.set(self.thresholds_key, json.dumps(values, sort_keys=True))
        self.audit.record("thresholds", actor, self.thresholds_key, {"before": before, "after": values})
        return self.thresholds()

    def banks(self) -> dict[str, dict[str, Any]]:
        return {b.name: _bank_json(b) for b in self.bank_store.all_banks()}

    def bank(self, name: str) -> dict[str, Any] | None:
        try:
            return _bank_json(self.bank_store.get(name))
        except KeyError:
            return None

    def put_bank(self, name: str, spec: BankSpec, actor: str) -> bool:
        """Creates or updates; True when it was created."""
        created = self.bank(name) is None
        if created:
            self.bank_store.create(name, spec.description)
        self.bank_store.set_enabled(name, spec.enabled, spec.description)
        self.audit.record("bank_created" if created else "bank_updated", actor, name, spec.model_dump())
        return created

    def add_bank_hashes(self, name: str, body: BankHashes, actor: str) -> int:
        """Raises KeyError for an unknown bank."""
        added = self.bank_store.add_hashes(name, [(h.kind, h.value) for h in body.hashes])
        self.audit.record("bank_hashes_added", actor, name, {"count": added})
        return added

    def delete_bank(self, name: str, actor: str) -> bool:
        if self.bank(name) is None:
            return False
        self.bank_store.remove(name)
        self.audit.record("bank_deleted", actor, name, {})
        return True

    def request_promotion(self, request: PromotionRequest, actor: str) -> str:
        record = self.ledger.request(request.model, request.version, request.reason, actor)
        details = {**request.model_dump(), "request_id": record.request_id}
        self.audit.record("promotion_requested", actor, f"{request.model}/{request.version}", details)
        return record.request_id

    def promotions(self, count: int) -> list[dict[str, Any]]:
        """Newest first, each with its state (requested / running / promoted / refused) and why."""
        return [r.model_dump(mode="json") for r in self.ledger.recent(count)]

    def promotion(self, request_id: str) -> dict[str, Any] | None:
        record = self.ledger.get(request_id)
        return record.model_dump(mode="json") if record else None

    def audit_log(self, count: int) -> list[dict[str, Any]]:
        return self.audit.recent(count)


def _bank_json(bank: Bank) -> dict[str, Any]:
    return {
        "description": bank.description,
        "enabled": bank.enabled,
        "size": bank.size,
        "created_at": round(bank.created_at, 3),
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
