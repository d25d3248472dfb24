"""Copy-detection metrics on hand-built cases whose answers are worked out in the comments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.evaluation.benchmark import load_folder_benchmark
from services.evaluation.metrics import (
    Predictions,
    best_f1_threshold,
    decide,
    evaluate,
    micro_ap,
    recall_at_precision,
    roc_auc,
    threshold_for_precision,
)


def _pred(scores: list[float], correct: list[bool], positives: int) -> Predictions:
    return Predictions(np.asarray(scores, dtype=np.float64), np.asarray(correct), positives)


def test_micro_ap_of_a_perfect_ranking_is_one() -> None:
    assert micro_ap(_pred([0.9, 0.8, 0.1], [True, True, False], 2)) == pytest.approx(1.0)


def test_micro_ap_sums_precision_at_each_recall_step() -> None:
    # Ranked: hit, miss, hit, hit. Precision at the hits: 1/1, 2/3, 3/4; each hit adds 1/3 recall.
    pred = _pred([0.9, 0.8, 0.7, 0.6], [True, False, True, True], 3)
    assert micro_ap(pred) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # A fourth query whose original was never predicted caps recall at 3/4.
    assert micro_ap(_pred([0.9, 0.8, 0.7, 0.6], [True, False, True, True], 4)) == pytest.approx((1 + 2 / 3 + 3 / 4) / 4)


def test_tied_scores_form_one_operating_point() -> None:
    # The hit and the miss share a score: no ordering of them may earn precision 1 at recall 1.
    assert micro_ap(_pred([0.5, 0.5], [False, True], 1)) == pytest.approx(0.5)
    assert micro_ap(_pred([0.5, 0.5], [True, False], 1)) == pytest.approx(0.5)


def test_recall_at_precision_09() -> None:
    # Ten hits, a miss, a hit: P = 1 up to recall 10/12, then 10/11 = 0.909 and 11/12 = 0.917 at recall 11/12.
    scores = list(np.linspace(1.0, 0.5, 12))
    correct = [True] * 10 + [False, True]
    assert recall_at_precision(_pred(scores, correct, 12), 0.9) == pytest.approx(11 / 12)
    assert recall_at_precision(_pred(scores, correct, 12), 0.95) == pytest.approx(10 / 12)
    assert recall_at_precision(_pred([0.9], [False], 1), 0.9) == 0.0


def test_roc_auc_counts_wins_and_half_ties() -> None:
    # Pairs (pos, neg): 0.9>0.7, 0.9>0.85, 0.8>0.7, 0.8<0.85 -> 3 of 4.
    assert roc_auc(np.array([0.9, 0.8]), np.array([0.7, 0.85])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5]), np.array([0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([1.0, 2.0]), np.array([0.0])) == pytest.approx(1.0)


def test_the_decision_counts_wrong_matches_and_distractors_as_false_positives() -> None:
    top1 = np.array([0.95, 0.92, 0.91, 0.50])
    correct = np.array([True, False, False, True])  # query 1 matched the wrong original, query 2 is a distractor
    has_truth = np.array([True, True, False, True])
    d = decide(top1, correct, has_truth, 0.9)
    assert (d.tp, d.fp, d.fn) == (1, 2, 2)
    assert d.precision == pytest.approx(1 / 3) and d.recall == pytest.approx(1 / 3) and d.f1 == pytest.approx(1 / 3)


def test_best_threshold_sits_between_the_scores_it_separates() -> None:
    top1 = np.array([0.9, 0.8, 0.4, 0.3])
    correct = np.array([True, True, False, False])
    has_truth = np.array([True, True, False, False])
    best = best_f1_threshold(top1, correct, has_truth)
    assert best.f1 == pytest.approx(1.0)
    assert best.threshold == pytest.approx(0.6)


def test_threshold_for_precision_takes_the_most_recall_that_keeps_the_target() -> None:
    # Scores high to low: hit, hit, distractor, hit. Cutting at .7 keeps P = 1; at .5 P drops to 3/4.
    top1 = np.array([0.9, 0.8, 0.6, 0.5])
    correct = np.array([True, True, False, True])
    has_truth = np.array([True, True, False, True])
    strict = threshold_for_precision(top1, correct, has_truth, 0.99)
    assert strict.threshold == pytest.approx(0.8) and strict.recall == pytest.approx(2 / 3)
    loose = threshold_for_precision(top1, correct, has_truth, 0.75)
    assert loose.threshold == pytest.approx(0.5) and loose.recall == pytest.approx(1.0)


def test_threshold_for_precision_can_also_cap_the_strangers_flagged() -> None:
    # Three strangers (no original) among eight queries; precision alone would cut at .5 and flag two of them.
    top1 = np.array([0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.5, 0.3])
    correct = np.array([True, True, True, False, True, False, True, False])
    has_truth = np.array([True, True, True, False, True, False, True, False])
    assert threshold_for_precision(top1, correct, has_truth, 0.7).threshold == pytest.approx(0.5)
    capped = threshold_for_precision(top1, correct, has_truth, 0.7, max_negatives=0.34)  # at most 1 of 3
    assert capped.threshold == pytest.approx(0.6) and capped.fp == 1
    none = threshold_for_precision(top1, correct, has_truth, 0.7, max_negatives=0.0)
    assert none.threshold == pytest.approx(0.7) and none.fp == 0


def test_evaluate_on_a_small_similarity_matrix() -> None:
    # Two references; three queries: copy of ref 0, copy of ref 1 (but closer to ref 0), a distractor.
    sim = np.array([[0.95, 0.10], [0.70, 0.60], [0.40, 0.30]])
    truth = np.array([0, 1, -1])
    m = evaluate(sim, truth, threshold=0.5, k=2)
    assert m["top1_accuracy"] == pytest.approx(0.5)
    # Flagged at 0.5: q0 (right), q1 (wrong original) -> TP 1, FP 1, FN 1.
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    # Ranking of all 6 pairs: .95 hit, .70 miss, .60 hit, .40, .30, .10 -> AP = (1 + 2/3) / 2.
    assert m["micro_ap"] == pytest.approx((1 + 2 / 3) / 2)
    # Duplicate pairs .95 and .60 against the four others (.10 .70 .40 .30): 4 + 3 wins of 8.
    assert m["roc_auc"] == pytest.approx(7 / 8)
    # Query level: top-1 of copies (.95, .70) all above the distractor's .40.
    assert m["detection_roc_auc"] == pytest.approx(1.0)


def test_a_folder_benchmark_reads_ids_with_or_without_extensions(tmp_path: Path) -> None:
    queries, references = tmp_path / "q", tmp_path / "r"
    queries.mkdir()
    references.mkdir()
    rng = np.random.default_rng(0)
    for folder, name in ((references, "a.png"), (references, "b.png"), (queries, "qa.jpg"), (queries, "qn.jpg")):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / name)
    csv = tmp_path / "truth.csv"
    csv.write_text("query_id,reference_id\nqa.jpg,a\nqn,\n")
    bench = load_folder_benchmark(queries, references, csv)
    assert bench.reference_ids == ["a.png", "b.png"]
    assert bench.query_ids == ["qa.jpg", "qn"]
    assert list(bench.truth_index()) == [0, -1]
    assert bench.query_pixels.shape == (2, 256, 256, 3)
