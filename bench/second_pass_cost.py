"""What the second pass costs end to end: the e2e stage with it off, then on, in one run.

    python -m bench.second_pass_cost [--quick]     # writes bench/results/second_pass_cost.json

Same photos, same stack, same moderator batch size; only ``SIEVE_VERIFY_SECOND_PASS`` and
``SIEVE_VERIFY_QUERY_REGIONS`` (the uploads' regions, where geometry agrees but the score fell short) differ.
The stream's uploads are mostly unique photos, none surely a copy: the second pass runs for nearly every one of
them, which is its worst case. The goal (issue 29): throughput with it on stays >= 0.9x of the same code with it off.
"""

from __future__ import annotations

from typing import Any

from bench.ab_e2e import cost_of
from bench.common import main_for

GOAL_RATIO = 0.90


def run(quick: bool = False) -> dict[str, Any]:
    return cost_of(
        "second_pass_cost",
        ("SIEVE_VERIFY_SECOND_PASS", "SIEVE_VERIFY_QUERY_REGIONS"),
        ("without_second_pass", "with_second_pass"),
        GOAL_RATIO,
        quick,
    )


if __name__ == "__main__":
    raise SystemExit(main_for("second_pass_cost", run))
