"""Thresholds an admin sets through the reviewer API reach the moderator through Redis."""

from __future__ import annotations

import json

import redis

from services.common.config import Settings
from services.moderator.pipeline import Pipeline


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
