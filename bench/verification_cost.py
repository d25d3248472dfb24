"""What local-feature verification costs end to end: the e2e stage with it off, then on, in one run.

    python -m bench.verification_cost [--quick]     # writes bench/results/verification_cost.json

Same photos, same stack, same moderator batch size; only ``SIEVE_VERIFY_ENABLED`` differs. The goal (issue 20):
throughput drops by at most 20%.
"""

from __future__ import annotations

from typing import Any

from bench.ab_e2e import off_then_on
from bench.common import main_for

GOAL_RATIO = 0.80


def run(quick: bool = False) -> dict[str, Any]:
    compared = off_then_on("SIEVE_VERIFY_ENABLED", ("without_verification", "with_verification"), quick)
    ratio = compared["throughput_ratio"]
    return {
        "stage": "verification_cost",
        "quick": quick,
        "saturation_uploads_per_s": compared["saturation_uploads_per_s"],
        "throughput_ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "meets_goal": ratio >= GOAL_RATIO,
        "runs": compared["runs"],
    }


if __name__ == "__main__":
    raise SystemExit(main_for("verification_cost", run))
