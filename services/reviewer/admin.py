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

from services.common.audit import AuditLog
from services.common.banks import Bank, BankMatch, HashBankStore, Signal, UploadSignals, parse_signal
from services.common.banks.embeddings import EmbeddingBanks
from services.common.banks.exchange import ImportReport, ListFormat, guess_format, read_source
from services.common.banks.images import banked_image
from services.common.banks.near import BankEmbeddingRule, NearBankMatcher
from services.common.banks.operations import BankOperations
from services.common.banks.signals import SignalType
from services.common.config import BankSettings, DecisionSettings, FetchSettings, Settings
from services.common.errors import TransientError
from services.common.inference import ImageModels
from services.common.promotions import PromotionLedger
from services.common.thresholds import ThresholdResolver, overrides_key
from services.common.verification import QueryFeatures, Verifier

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
    action: Literal["block", "review"] = "block"  # what a match does: block, or send to human review


class BankHash(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["sha256", "md5", "pdq", "phash"]
    value: str = Field(pattern=r"^[0-9a-f]{16,64}$")


class BankHashes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hashes: list[BankHash] = Field(min_length=1, max_length=10_000)


class BankThreshold(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedding_threshold: float | None = Field(ge=0.0, le=1.0)


class BankSignal(BaseModel):
    """One signal in HMA's terms: type, value, and optionally the banked item's id and metadata."""

    model_config = ConfigDict(extra="forbid")

    signal_type: str = Field(max_length=40)
    signal_value: str = Field(max_length=200)
    content_id: str = Field(default="", max_length=200)
    metadata: dict[str, str] = Field(default_factory=dict)

    def parsed(self) -> Signal:
        """Raises MalformedSignal."""
        return parse_signal(self.signal_type, self.signal_value, self.content_id, self.metadata)


class BankSignals(BaseModel):
    model_config = ConfigDict(extra="forbid")

    signals: list[BankSignal] = Field(min_length=1, max_length=10_000)


class BankImport(BaseModel):
    """A hash list given inline (``text``) or fetched from an allow-listed ``url``; ``format`` guessed if absent."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, max_length=64 * 1024 * 1024)
    url: str | None = Field(default=None, max_length=4096)
    format: Literal["te", "csv"] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> BankImport:
        if (self.text is None) == (self.url is None):
            raise ValueError("give exactly one of text and url")
        return self


class PromotionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="sieve_embedder", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    version: str = Field(pattern=r"^[0-9]{1,9}$")
    reason: str = Field(default="", max_length=1000)


class AdminStore:
    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str,
        decision: DecisionSettings,
        audit: AuditLog,
        banks: BankSettings | None = None,
        fetch: FetchSettings | None = None,
        settings: Settings | None = None,
        models: ImageModels | None = None,
    ) -> None:
        self.client = client
        self.decision = decision
        self.audit = audit
        self.thresholds_key = overrides_key(key_prefix)
        self.settings = settings or Settings()
        self.bank_settings = banks or BankSettings()
        self.fetch_settings = fetch or FetchSettings()
        self.bank_store = HashBankStore.configured(client, key_prefix, self.bank_settings)
        self.models = models  # the served embedder, for the match API's near matches (None: hashes only)
        verifier = Verifier(self.settings.verify)
        self.resolver = ThresholdResolver(self.decision, self.bank_settings, client, key_prefix)
        self.near_banks = NearBankMatcher(
            self.bank_store,
            EmbeddingBanks(client, key_prefix, self.bank_settings.sync_interval_s, verifier.keypoint_index),
            BankEmbeddingRule(self.resolver, verifier),
            models.infer if models is not None else None,
        )
        self.ops = BankOperations(self.bank_store, audit, self.settings, models, self.near_banks.embeddings)
        self.ledger = PromotionLedger(client, key_prefix)

    def _overrides(self) -> ThresholdOverrides:
        raw = self.client.get(self.thresholds_key)
        return ThresholdOverrides.model_validate_json(raw) if raw else ThresholdOverrides()

    def thresholds(self) -> dict[str, Any]:
        """The overrides, the settings they give, and per model version the thresholds the moderator applies
        (the same resolver: overrides, recorded at promotion, configured), each with where it comes from."""
        overrides = self._overrides().model_dump(exclude_none=True)
        base = {f: getattr(self.decision, f) for f in EffectiveThresholds.model_fields}
        self.resolver.refresh(force=True)
        per_version = {v: self.resolver.effective(v) for v in self.resolver.versions()}
        return {
            "key": self.thresholds_key,
            "overrides": overrides,
            "effective": {**base, **overrides},
            "per_version": per_version,
        }

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
            self.ops.create(name, spec.description, spec.action, actor)
            if not spec.enabled:
                self.ops.set_enabled(name, False, actor)
        else:
            self.ops.update(name, spec.enabled, spec.description, spec.action, actor)
        return created

    def add_bank_hashes(self, name: str, body: BankHashes, actor: str) -> int:
        """The older face of ``add_bank_signals`` (hash kinds only). Raises KeyError for an unknown bank and
        MalformedSignal for a bad hash."""
        signals = [parse_signal(h.kind, h.value) for h in body.hashes]
        return int(self.ops.add_signals(name, signals, actor)["added"])

    def add_bank_images(self, name: str, images: list[bytes], actor: str) -> dict[str, Any]:
        """Raises KeyError for an unknown bank and BadInput for something that is not an allowed image."""
        return self.ops.add_images(name, images, actor)

    def banked_image(self, bank: str, item_id: str) -> bytes | None:
        return self.ops.banked_image_png(bank, item_id)

    def has_banked_image(self, bank: str, item_id: str) -> bool:
        return self.ops.embeddings.has_pixels(bank, item_id)

    def set_bank_threshold(self, name: str, threshold: float | None, actor: str) -> dict[str, Any]:
        """Raises KeyError for an unknown bank."""
        return _bank_json(self.ops.set_threshold(name, threshold, actor))

    def reembed_banks(self, names: list[str], actor: str) -> dict[str, Any]:
        """Raises KeyError for an unknown bank and TransientError when the embedder cannot be reached."""
        return self.ops.reembed(names or [b.name for b in self.bank_store.all_banks()], actor)

    def request_rejudge(self, name: str, actor: str) -> dict[str, Any]:
        """Raises KeyError for an unknown bank."""
        return self.ops.request_rejudge(name, actor)

    def rejudge_progress(self, name: str) -> dict[str, Any]:
        """Raises KeyError for an unknown bank."""
        return self.ops.rejudge_progress(name)

    def add_bank_signals(self, name: str, body: BankSignals, actor: str) -> dict[str, Any]:
        """Raises KeyError for an unknown bank and MalformedSignal (nothing added) for a bad signal."""
        return self.ops.add_signals(name, [s.parsed() for s in body.signals], actor)

    def remove_bank_signals(self, name: str, body: BankSignals, actor: str) -> dict[str, Any]:
        """Raises KeyError for an unknown bank and MalformedSignal for a bad signal."""
        return self.ops.remove_signals(name, [s.parsed() for s in body.signals], actor)

    def import_bank(self, name: str, body: BankImport, actor: str) -> dict[str, Any]:
        """Raises KeyError for an unknown bank; BadInput/TransientError when the URL cannot be fetched."""
        self.bank_store.get(name)
        source = body.url or "request body"
        text = (
            body.text
            if body.text is not None
            else read_source(source, self.fetch_settings, self.bank_settings.import_max_bytes)
        )
        fmt: ListFormat = body.format or guess_format(text, body.url or "")
        report: ImportReport = self.ops.import_list(name, text, fmt, source, actor)
        return {**report.as_dict(max_malformed=10_000), "rejudge_requested": report.added > 0}

    def export_bank(self, name: str, fmt: ListFormat, kind: SignalType | None, actor: str) -> str:
        """Raises KeyError for an unknown bank."""
        return self.ops.export(name, fmt, kind, actor)

    def lookup_signal(self, signal_type: str, value: str) -> list[dict[str, Any]]:
        """Raises MalformedSignal."""
        return [_match_json(m) for m in self.bank_store.lookup(parse_signal(signal_type, value))]

    def lookup_image(self, data: bytes) -> dict[str, Any]:
        """Hashes the image as the moderator does, and (with the embedder at hand) finds banked images it is an
        edited copy of, by the moderator's rule; raises BadInput for something that is not an allowed image."""
        image = banked_image(data, self.settings)
        found = self.bank_store.match(UploadSignals(**{s.kind: s.value for s in image.signals}))
        near: str = "not_configured"
        if self.models is not None:
            try:
                result = self.models.infer(image.pixels[None])
                query = QueryFeatures(image.features) if image.features is not None else None
                found += self.near_banks.match(result.model_version, result.embeddings[0], query, image.pixels)
                near = result.model_version
            except TransientError as exc:
                near = f"unavailable: {exc}"  # the hash matches still answer
        return {
            "signals": {s.kind: s.value for s in image.signals},
            "matches": [_match_json(m) for m in found],
            "near_matches_by": near,
        }

    def delete_bank(self, name: str, actor: str) -> bool:
        return self.ops.delete(name, actor)

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


def _match_json(match: BankMatch) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bank": match.bank,
        "signal_type": match.signal_type,
        "distance": match.distance,
        "content_id": match.item_id,
        "signal": match.value,
        "action": match.action,
    }
    if match.signal_type == "embedding":  # the fused score that met the bank's threshold, and its evidence
        out.update(score=match.score, inliers=match.inliers)
    return out


def _bank_json(bank: Bank) -> dict[str, Any]:
    return {
        "description": bank.description,
        "enabled": bank.enabled,
        "action": bank.action,
        "embedding_threshold": bank.embedding_threshold,
        "size": bank.size,
        "created_at": round(bank.created_at, 3),
    }
