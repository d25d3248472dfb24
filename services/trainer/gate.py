"""The promotion gate: a candidate ships only if it is not worse than the serving model on data it never saw.

Two checks, both recorded: the held-out photo benchmark (µAP, the model card's metric) and the held-out slice of
reviewer feedback (F1 of the duplicate decision at the configured threshold on labelled pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.trainer.finetune import PairBatch

EmbedFn = Callable[[NDArray[np.uint8]], NDArray[np.float32]]


@dataclass(frozen=True)
class GateResult:
    promote: bool
    why: str
    serving: dict[str, float]
    candidate: dict[str, float]


def pair_f1(embed: EmbedFn, pairs: PairBatch, threshold: float) -> float:
    if len(pairs.duplicate) == 0:
        return float("nan")
    sim = (embed(pairs.left) * embed(pairs.right)).sum(axis=1)
    predicted = sim >= threshold
    tp = int((predicted & pairs.duplicate).sum())
    fp = int((predicted & ~pairs.duplicate).sum())
    fn = int((~predicted & pairs.duplicate).sum())
    return 2 * tp / max(2 * tp + fp + fn, 1)


def benchmark_map(embed: EmbedFn, bench: Any, threshold: float) -> float:
    from services.evaluation.metrics import evaluate

    refs = embed(bench.reference_pixels)
    queries = embed(bench.query_pixels)
    return float(evaluate(queries @ refs.T, bench.truth_index(), threshold)["micro_ap"])


def gate(
    serving: EmbedFn,
    candidate: EmbedFn,
    heldout_pairs: PairBatch,
    threshold: float,
    bench: Any | None,
    tolerance: float = 0.005,
) -> GateResult:
    # A check with no data (no held-out labels yet) is left out of the record, not written as NaN.
    s: dict[str, float] = {}
    c: dict[str, float] = {}
    if len(heldout_pairs.duplicate):
        s["feedback_f1"] = pair_f1(serving, heldout_pairs, threshold)
        c["feedback_f1"] = pair_f1(candidate, heldout_pairs, threshold)
    if bench is not None:
        s["benchmark_micro_ap"] = benchmark_map(serving, bench, threshold)
        c["benchmark_micro_ap"] = benchmark_map(candidate, bench, threshold)
    if not s:
        return GateResult(False, "no held-out check to pass (no held-out labels and no benchmark)", s, c)
    worse = [k for k in s if c[k] < s[k] - tolerance]
    if worse:
        return GateResult(False, f"worse on {', '.join(worse)}", s, c)
    return GateResult(True, f"not worse on {', '.join(s)}", s, c)
