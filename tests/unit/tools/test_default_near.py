"""``default_near``: where ``sieve dedup`` and ``sieve explain`` take their threshold from, checked with literals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.tools.dedup import default_near, moderator_threshold


def test_a_configured_version_uses_its_configured_threshold() -> None:
    assert default_near("sieve_embedder:2")[0] == pytest.approx(0.6766)
    assert default_near("sieve_embedder:1")[0] == pytest.approx(0.90)
    assert moderator_threshold("sieve_embedder:2")[0] == pytest.approx(0.6766)


def test_an_unconfigured_version_uses_its_model_card(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "model_card.json").write_text(json.dumps({"duplicate_threshold": 0.612}))
    assert default_near("sieve_embedder:7", tmp_path) == (0.612, "model_card.json of sieve_embedder:7")


def test_an_unknown_version_without_a_card_uses_the_global_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert default_near("sieve_embedder:9", tmp_path)[0] == pytest.approx(0.80)
    monkeypatch.setenv("SIEVE_DECISION_DUPLICATE_THRESHOLD", "0.77")
    assert default_near("sieve_embedder:9", tmp_path) == (0.77, "SIEVE_DECISION_DUPLICATE_THRESHOLD")


def test_the_configuration_wins_over_the_model_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "model_card.json").write_text(json.dumps({"duplicate_threshold": 0.5}))
    monkeypatch.setenv("SIEVE_DECISION_VERSION_THRESHOLDS", json.dumps({"sieve_embedder:2": 0.71}))
    assert default_near("sieve_embedder:2", tmp_path)[0] == pytest.approx(0.71)
