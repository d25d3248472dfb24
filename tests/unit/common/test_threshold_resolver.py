"""The one threshold resolver, without Redis: configured thresholds, model cards and defaults, in that order,
each with a source a user can look up. Redis-held overrides and recorded thresholds are covered against a real
Redis in tests/integration/test_admin_overrides.py and test_promotion.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.config import BankSettings, DecisionSettings
from services.common.thresholds import ThresholdResolver, card_threshold


@pytest.fixture()
def cards(tmp_path: Path) -> Path:
    for version, card in {"2": {"duplicate_threshold": 0.5}, "3": {"duplicate_threshold": 0.61}}.items():
        (tmp_path / version).mkdir()
        (tmp_path / version / "model_card.json").write_text(json.dumps(card))
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "model_card.json").write_text(json.dumps({"bank_embedding_threshold": 0.83}))
    return tmp_path


def _resolver(cards: Path | None) -> ThresholdResolver:
    decision = DecisionSettings(version_thresholds={"m:2": 0.7}, duplicate_threshold=0.8)
    banks = BankSettings(embedding_thresholds={"m:2": 0.85}, embedding_threshold=0.95)
    return ThresholdResolver(decision, banks, cards=cards)


def test_duplicates_configured_then_card_then_default(cards: Path) -> None:
    r = _resolver(cards)
    assert (r.duplicate("m:2").value, r.duplicate("m:2").source) == (0.7, "SIEVE_DECISION_VERSION_THRESHOLDS[m:2]")
    assert (r.duplicate("m:3").value, r.duplicate("m:3").source) == (0.61, "model_card.json of m:3")
    assert (r.duplicate("m:9").value, r.duplicate("m:9").source) == (0.8, "SIEVE_DECISION_DUPLICATE_THRESHOLD")
    assert _resolver(None).duplicate("m:3").value == 0.8  # no cards (the moderator): the default
    assert r.decision_for("m:3").duplicate_threshold == 0.61
    assert r.decision_for("m:3").flag_threshold == DecisionSettings().flag_threshold


def test_banks_own_then_configured_then_card_then_default(cards: Path) -> None:
    r = _resolver(cards)
    assert r.bank("m:2", 0.9).value == 0.9 and r.bank("m:2", 0.9).source == "the bank's own threshold"
    assert r.bank("m:2").value == 0.85
    assert (r.bank("m:4").value, r.bank("m:4").source) == (0.83, "model_card.json of m:4")
    assert (r.bank("m:3").value, r.bank("m:3").source) == (0.95, "SIEVE_BANKS_EMBEDDING_THRESHOLD")


def test_the_effective_view_lists_known_versions_with_sources(cards: Path) -> None:
    r = _resolver(cards)
    assert r.versions() == ["m:2"]
    assert r.effective("m:2") == {
        "duplicate_threshold": 0.7,
        "duplicate_threshold_source": "SIEVE_DECISION_VERSION_THRESHOLDS[m:2]",
        "bank_embedding_threshold": 0.85,
        "bank_embedding_threshold_source": "SIEVE_BANKS_EMBEDDING_THRESHOLDS[m:2]",
    }


def test_a_card_without_the_field_or_with_junk_gives_nothing(cards: Path) -> None:
    assert card_threshold(cards, "m:4") is None
    (cards / "5").mkdir()
    (cards / "5" / "model_card.json").write_text(json.dumps({"duplicate_threshold": "high"}))
    assert card_threshold(cards, "m:5") is None
    assert card_threshold(cards, "m:6") is None and card_threshold(None, "m:2") is None
