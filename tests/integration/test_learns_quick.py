"""``python -m bench.learns --quick`` end to end: streams, queue, oracle labels, fine-tune, gate, replay (~20 s)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import learns
from services.common.photos.build import Manifest


def test_quick_run_compares_equal_label_counts_and_writes_results(photo_set: Manifest, tmp_path: Path) -> None:
    # --require-redis: without redis-server the run fails instead of quietly using an unreachable Redis.
    argv = ["--quick", "--budgets", "3,50", "--random-seeds", "1", "--require-redis", "--out", str(tmp_path)]
    assert learns.main(argv) == 0
    result = json.loads((tmp_path / "learns.quick.json").read_text())
    assert not any("redis" in note.lower() and "not installed" in note for note in result["notes"])
    sets = result["label_sets"]
    queue = result["queue_a"]["queued"]
    for budget in (3, 50):
        active = next(r for r in sets if r["budget"] == budget and r["strategy"] == "active")
        random = next(r for r in sets if r["budget"] == budget and r["strategy"] == "random")
        assert active["labels"] == random["labels"] == min(budget, queue)
        assert active["labels"] == active["duplicate"] + active["not_duplicate"]
    full = {r["budget"]: r for r in sets if r["strategy"] == "random_full"}
    assert set(full) == {b for b in (3, 50) if b > queue}  # only where the active queue ran out first
    for budget, row in full.items():
        assert queue < row["labels"] <= budget  # capped by the uploads that have a neighbour
    assert (
        result["serving_replay_b"]["tp"] + result["serving_replay_b"]["fn"] == result["streams"]["B"]["true_duplicates"]
    )
    assert result["flag_f1"]["value"] is None and result["flag_f1"]["why"]
