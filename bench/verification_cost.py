"""What local-feature verification costs end to end: the e2e stage with it off, then on, in one run.

    python -m bench.verification_cost [--quick]     # writes bench/results/verification_cost.json

Same photos, same stack, same moderator batch size; only ``SIEVE_VERIFY_ENABLED`` differs. The goal (issue 20):
throughput drops by at most 20%.
"""

from __future__ import annotations

from typing import Any

from bench.ab_e2e import cost_of
from bench.common import main_for

GOAL_RATIO = 0.80


def run(quick: bool = False) -> dict[str, Any]:
    return cost_of(
        "verification_cost", "SIEVE_VERIFY_ENABLED", ("without_verification", "with_verification"), GOAL_RATIO, quick
    )


if __name__ == "__main__":
    raise SystemExit(main_for("verification_cost", run))
