"""The retraining job and admin requests promote through one Redis lock, and a stale plan is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from services.common.config import Settings
from services.trainer import promotion
from services.trainer.promotion import ModelRepository, PromotionFailed, promote

pytestmark = pytest.mark.integration


def _repo(tmp_path: Path, versions: list[int]) -> ModelRepository:
    for v in versions:
        (tmp_path / "repo" / "m" / str(v)).mkdir(parents=True)
    return ModelRepository(tmp_path / "repo", "m")


def _staged(tmp_path: Path, name: str = "staged") -> Path:
    staged = tmp_path / name
    staged.mkdir()
    return staged


def test_a_promotion_waits_for_the_one_running_and_gives_up_with_a_reason(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    repo = _repo(tmp_path, [1])
    monkeypatch.setattr(promotion, "PROMOTION_WAIT_S", 0.3)
    held = client.lock(f"{settings.redis.key_prefix}:trainer:promotion-lock:m", timeout=30)
    assert held.acquire(blocking=False)
    try:
        with pytest.raises(PromotionFailed, match="another promotion of m"):
            promote(settings, client, repo, _staged(tmp_path), None, None, tmp_path / "log", {})
    finally:
        held.release()
    assert repo.versions() == [1]  # nothing was installed


def test_a_plan_made_before_another_promotion_switched_versions_is_refused(settings: Settings, tmp_path: Path) -> None:
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    repo = _repo(tmp_path, [1, 2])  # the plan saw 1 serving; 2 was promoted meanwhile
    with pytest.raises(PromotionFailed, match="version 2 started serving"):
        promote(settings, client, repo, _staged(tmp_path), None, None, tmp_path / "log", {}, version=2, serving=1)
    with pytest.raises(PromotionFailed, match="not newer"):
        promote(settings, client, repo, _staged(tmp_path, "staged-2"), None, None, tmp_path / "log", {}, version=2)
    assert repo.versions() == [1, 2]
    lock_key = f"{settings.redis.key_prefix}:trainer:promotion-lock:m"
    assert not client.exists(lock_key)  # released after a refusal
