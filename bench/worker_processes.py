"""What the moderator's worker processes buy end to end: the e2e stage with the CPU stages (decode-and-hash,
verification) in the moderator process, then in two worker processes, in one run on one stack.

    python -m bench.worker_processes [--quick]     # writes bench/results/worker_processes.json

Only ``SIEVE_MODERATOR_WORKER_PROCESSES`` differs (0, then 2). The result chooses the default.
"""

from __future__ import annotations

from typing import Any

from bench.ab_e2e import one_then_other, saturation
from bench.common import main_for


def run(quick: bool = False) -> dict[str, Any]:
    compared = one_then_other("SIEVE_MODERATOR_WORKER_PROCESSES", {"in_process": "0", "two_workers": "2"}, quick)
    half = {label: next(r for r in run["rows"] if r["case"] != "saturation") for label, run in compared["runs"].items()}
    return {
        "stage": "worker_processes",
        "quick": quick,
        "saturation_uploads_per_s": {label: saturation(r)["images_per_s"] for label, r in compared["runs"].items()},
        "throughput_ratio": compared["throughput_ratio"],
        "other_rows": half,
        "runs": compared["runs"],
    }


if __name__ == "__main__":
    raise SystemExit(main_for("worker_processes", run))
