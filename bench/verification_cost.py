"""What local-feature verification costs end to end: the e2e stage with it off, then on, in one run.

    python -m bench.verification_cost [--quick]     # writes bench/results/verification_cost.json

Same photos, same stack, same moderator batch size; only ``SIEVE_VERIFY_ENABLED`` differs. The goal (issue 20):
throughput drops by at most 20%.
"""

from __future__ import annotations

import os
from typing import Any

from bench import stage_e2e
from bench.common import main_for
from services.common.stack import LocalStack

GOAL_RATIO = 0.80


def _saturation(result: dict[str, Any]) -> dict[str, Any]:
    return next(row for row in result["rows"] if row["case"] == "saturation")


def run(quick: bool = False) -> dict[str, Any]:
    stack = LocalStack()
    stack.start()
    runs: dict[str, dict[str, Any]] = {}
    previous = os.environ.get("SIEVE_VERIFY_ENABLED")
    try:
        for label, enabled in (("without_verification", "false"), ("with_verification", "true")):
            os.environ["SIEVE_VERIFY_ENABLED"] = enabled
            runs[label] = stage_e2e.run(quick=quick, stack=stack)
    finally:
        if previous is None:
            os.environ.pop("SIEVE_VERIFY_ENABLED", None)
        else:
            os.environ["SIEVE_VERIFY_ENABLED"] = previous
        stack.stop()
    off, on = _saturation(runs["without_verification"]), _saturation(runs["with_verification"])
    ratio = on["images_per_s"] / off["images_per_s"] if off["images_per_s"] else 0.0
    return {
        "stage": "verification_cost",
        "quick": quick,
        "saturation_uploads_per_s": {"without": off["images_per_s"], "with": on["images_per_s"]},
        "throughput_ratio": round(ratio, 3),
        "goal_ratio": GOAL_RATIO,
        "meets_goal": ratio >= GOAL_RATIO,
        "runs": runs,
    }


if __name__ == "__main__":
    raise SystemExit(main_for("verification_cost", run))
