"""Copy-detection metrics: DISC21 micro-AP, recall at precision 0.9, top-1 accuracy, the thresholded decision, AUC.

Everything starts from a query x reference similarity matrix and, per query, the index of its true reference
(-1 for a distractor query). Ties in the scores are handled as ties (hash baselines produce many), so no
method gains from an arbitrary order of equal scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Predictions:
    """Top-k candidate pairs per query, flattened: the DISC21 submission format."""

    scores: FloatArray  # (n,) similarity, higher = more likely a copy
    correct: NDArray[np.bool_]  # (n,) the pair is the query's true reference
    n_positive_queries: int  # queries that have a reference: the recall denominator


def top_k(similarity: NDArray[Any], k: int) -> tuple[NDArray[np.int64], FloatArray]:
    """Indices and scores of the k most similar references per query, best first."""
    k = min(k, similarity.shape[1])
    idx = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return idx.astype(np.int64), np.take_along_axis(similarity, idx, axis=1).astype(np.float64)


def predictions(similarity: NDArray[Any], truth: NDArray[np.int64], k: int = 10) -> Predictions:
    idx, scores = top_k(similarity, k)
    correct = idx == truth[:, None]
    return Predictions(scores.ravel(), correct.ravel(), int((truth >= 0).sum()))


def precision_recall(pred: Predictions) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Precision and recall at every distinct score threshold, from the highest score down."""
    order = np.argsort(-pred.scores, kind="stable")
    scores = pred.scores[order]
    tp = np.cumsum(pred.correct[order]).astype(np.float64)
    n = np.arange(1, len(scores) + 1, dtype=np.float64)
    # Only the last position of a run of equal scores is a real operating point.
    last = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, dtype=bool)
    precision = tp[last] / n[last]
    recall = tp[last] / max(pred.n_positive_queries, 1)
    return precision, recall, scores[last]


def micro_ap(pred: Predictions) -> float:
    """DISC21 µAP: one global ranking of all predicted pairs; AP = sum of precision x recall increments."""
    precision, recall, _ = precision_recall(pred)
    if len(recall) == 0 or pred.n_positive_queries == 0:
        return 0.0
    increments = np.diff(np.r_[0.0, recall])
    return float((increments * precision).sum())


def recall_at_precision(pred: Predictions, target: float = 0.9) -> float:
    precision, recall, _ = precision_recall(pred)
    ok = precision >= target
    return float(recall[ok].max()) if ok.any() else 0.0


def roc_auc(positive: NDArray[Any], negative: NDArray[Any]) -> float:
    """Mann-Whitney form of the ROC area: P(positive > negative) + P(equal) / 2, exact with ties."""
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left")
    below_or_equal = np.searchsorted(neg_sorted, pos, side="right")
    wins = below.sum() + 0.5 * (below_or_equal - below).sum()
    return float(wins / (len(pos) * len(neg)))


@dataclass(frozen=True)
class Decision:
    threshold: float
    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int


def decide(
    top1_score: NDArray[Any], top1_correct: NDArray[np.bool_], has_truth: NDArray[np.bool_], t: float
) -> Decision:
    """The moderator's rule: a query is a duplicate of its nearest reference when the score reaches t.

    A flagged query counts as a true positive only if that nearest reference is the right one; a flagged
    distractor or a wrong reference is a false positive, and every positive query not correctly flagged is a
    false negative.
    """
    flagged = np.asarray(top1_score) >= t
    tp = int((flagged & top1_correct).sum())
    fp = int((flagged & ~top1_correct).sum())
    fn = int(has_truth.sum()) - tp
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Decision(float(t), precision, recall, f1, tp, fp, fn)


def best_f1_threshold(
    top1_score: NDArray[Any], top1_correct: NDArray[np.bool_], has_truth: NDArray[np.bool_]
) -> Decision:
    """Calibration (on a validation benchmark only): the threshold with the best F1, midway between scores."""
    candidates = np.unique(np.asarray(top1_score, dtype=np.float64))
    if len(candidates) == 0:
        return decide(top1_score, top1_correct, has_truth, 1.0)
    cuts = np.r_[candidates[0], (candidates[1:] + candidates[:-1]) / 2, candidates[-1] + 1e-6]
    best = max((decide(top1_score, top1_correct, has_truth, c) for c in cuts), key=lambda d: (d.f1, d.threshold))
    return best


def threshold_for_precision(
    top1_score: NDArray[Any],
    top1_correct: NDArray[np.bool_],
    has_truth: NDArray[np.bool_],
    target: float,
    max_negatives: float | None = None,
) -> Decision:
    """The lowest threshold whose decisions keep precision >= target (the most recall at that precision) and,
    with ``max_negatives``, flag at most that share of the queries that have no original (what users see as
    false matches, whatever the mix of copies and strangers in the stream)."""
    scores = np.asarray(top1_score, dtype=np.float64)
    candidates = np.unique(scores)
    strangers = scores[~np.asarray(has_truth)]
    best = decide(top1_score, top1_correct, has_truth, float(candidates[-1]) + 1e-6 if len(candidates) else 1.0)
    for cut in candidates[::-1]:
        if max_negatives is not None and len(strangers) and float((strangers >= cut).mean()) > max_negatives:
            continue
        decision = decide(top1_score, top1_correct, has_truth, float(cut))
        if decision.precision >= target and decision.recall > best.recall:
            best = decision
    return best


def evaluate(
    similarity: NDArray[Any], truth: NDArray[np.int64], threshold: float, k: int = 10
) -> dict[str, float | int]:
    """All metrics for one set of queries (pass the rows of one family for per-family numbers)."""
    sim = np.asarray(similarity, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.int64)
    has_truth = truth >= 0
    pred = predictions(sim, truth, k)
    idx, scores = top_k(sim, 1)
    top1_score = scores[:, 0]
    top1_correct = idx[:, 0] == truth
    decision = decide(top1_score, top1_correct, has_truth, threshold)
    pair_pos = sim[np.arange(len(truth))[has_truth], truth[has_truth]]
    neg_mask = np.ones_like(sim, dtype=bool)
    neg_mask[np.arange(len(truth))[has_truth], truth[has_truth]] = False
    n_pos = int(has_truth.sum())
    return {
        "queries": len(truth),
        "positive_queries": n_pos,
        "micro_ap": micro_ap(pred),
        "recall_at_p90": recall_at_precision(pred, 0.9),
        "top1_accuracy": float(top1_correct[has_truth].mean()) if n_pos else float("nan"),
        "threshold": float(threshold),
        "precision": decision.precision,
        "recall": decision.recall,
        "f1": decision.f1,
        "tp": decision.tp,
        "fp": decision.fp,
        "fn": decision.fn,
        # Pair level (duplicate pairs against every non-duplicate pair), the papers' ROC.
        "roc_auc": roc_auc(pair_pos, sim[neg_mask]),
        # Query level: does the best score tell copies from distractor queries?
        "detection_roc_auc": roc_auc(top1_score[has_truth], top1_score[~has_truth]),
    }
