"""Thresholds an admin sets through the reviewer API reach the moderator through Redis."""

from __future__ import annotations

import json

import redis

from services.common.audit import AuditLog
from services.common.config import Settings
from services.common.thresholds import record_threshold
from services.moderator.pipeline import Pipeline
from services.reviewer.admin import AdminStore, ThresholdOverrides


class _NoModels:
    def infer(self, images: object) -> object:
        raise AssertionError("not called")


def test_threshold_overrides_apply_and_can_be_withdrawn(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    pipeline = Pipeline(settings, _NoModels(), client)  # type: ignore[arg-type]
    key = f"{settings.redis.key_prefix}:config:thresholds"
    client.set(key, json.dumps({"duplicate_threshold": 0.93}))
    pipeline.apply_threshold_overrides()
    assert pipeline.settings.decision.duplicate_threshold == 0.93
    assert pipeline.settings.decision.flag_threshold == settings.decision.flag_threshold
    client.delete(key)
    pipeline.apply_threshold_overrides()
    assert pipeline.settings.decision == settings.decision
    pipeline.close()


def test_each_model_version_decides_with_its_own_threshold(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    pipeline = Pipeline(settings, _NoModels(), client)  # type: ignore[arg-type]
    calibrated = settings.decision.version_thresholds
    assert pipeline.decision_for("sieve_embedder:2").duplicate_threshold == calibrated["sieve_embedder:2"]
    assert pipeline.decision_for("sieve_embedder:1").duplicate_threshold == calibrated["sieve_embedder:1"]
    assert pipeline.decision_for("unknown:9").duplicate_threshold == settings.decision.duplicate_threshold
    client.set(f"{settings.redis.key_prefix}:config:thresholds", json.dumps({"duplicate_threshold": 0.5}))
    pipeline.apply_threshold_overrides()
    assert pipeline.decision_for("sieve_embedder:2").duplicate_threshold == 0.5  # the admin's word wins
    pipeline.close()


def test_the_admin_api_shows_the_thresholds_the_moderator_applies_to_a_promoted_version(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    prefix = settings.redis.key_prefix
    promoted = "sieve_embedder:77"  # a version no configuration lists: only its promotion recorded it
    record_threshold(client, prefix, promoted, 0.61)
    record_threshold(client, prefix, promoted, 0.74, kind="bank")
    pipeline = Pipeline(settings, _NoModels(), client)  # type: ignore[arg-type]
    admin = AdminStore(client, prefix, settings.decision, AuditLog(client, prefix), settings.banks)
    try:
        shown = admin.thresholds()["per_version"]
        assert shown[promoted]["duplicate_threshold"] == pipeline.decision_for(promoted).duplicate_threshold == 0.61
        assert shown[promoted]["bank_embedding_threshold"] == pipeline.bank_rule.threshold(promoted, None) == 0.74
        assert shown[promoted]["duplicate_threshold_source"] == f"recorded when {promoted} was promoted"
        configured = "sieve_embedder:2"
        assert shown[configured]["duplicate_threshold"] == pipeline.decision_for(configured).duplicate_threshold
        assert shown[configured]["duplicate_threshold"] == settings.decision.version_thresholds[configured]

        admin.set_thresholds(ThresholdOverrides(duplicate_threshold=0.55), "root")
        pipeline.apply_threshold_overrides()
        shown = admin.thresholds()["per_version"]
        for version in (promoted, configured):  # the admin's word wins for every version, on both faces
            assert shown[version]["duplicate_threshold"] == pipeline.decision_for(version).duplicate_threshold == 0.55
    finally:
        client.delete(f"{prefix}:config:thresholds")
        client.hdel(f"{prefix}:config:version_thresholds", promoted)
        client.hdel(f"{prefix}:config:bank_thresholds", promoted)
        pipeline.close()
