"""Expected duplicate thresholds, read from the shipped files by the test itself rather than by the code under test.

A version's threshold is the one its model card records when it shipped; a version with no card (v1) has the
figure written here, the one its release notes gave. A test comparing the code's choice with this value fails
if the code picks another version's threshold, the global default, or a stale configuration entry.
"""

from __future__ import annotations

import json
from pathlib import Path

EMBEDDER_REPO = Path(__file__).resolve().parents[1] / "model_repo" / "sieve_embedder"
# Versions shipped before model cards recorded the threshold.
WITHOUT_CARD = {"sieve_embedder:1": 0.90}


def expected_threshold(model_version: str) -> float:
    card = EMBEDDER_REPO / model_version.rsplit(":", 1)[-1] / "model_card.json"
    if card.exists():
        return float(json.loads(card.read_text())["duplicate_threshold"])
    return WITHOUT_CARD[model_version]
