"""Stage 5: the whole pipeline, Kafka -> moderator -> verdicts, at saturation and at half load.

Every upload is a distinct real photo, so each one goes through fetch, decode, Triton and FAISS (no fast paths).
Latency is from the producer's send to the verdict's append time in Kafka.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from bench.common import StageResult, main_for
from bench.stream import StreamPlan, moderator_batch_size, prepare_images, run_stream
from services.common.config import REPO_ROOT
from services.common.stack import LocalStack


def run(quick: bool = False, stack: LocalStack | None = None) -> dict[str, Any]:
    result = StageResult("e2e", "Stage 5: end to end, Kafka -> moderator -> verdicts", quick).begin()
    n = 64 if quick else 800
    images = prepare_images(REPO_ROOT / "var" / "bench" / "e2e-images", n)
    own = stack is None
    stack = stack or LocalStack()
    endpoints = stack.start() if own else stack.endpoints()
    try:
        saturation = run_stream(stack, endpoints, StreamPlan(n, 0, 0), 1, images, "e2e-saturation")
        rate = max(saturation.throughput_per_s / 2, 0.5)
        half_n = max(int(rate * (30 if quick else 90)), 16)
        half = run_stream(stack, endpoints, StreamPlan(min(half_n, n), 0, 0, rate_per_s=rate), 1, images, "e2e-half")
    finally:
        if own:
            stack.stop()
    for label, run_ in (("saturation", saturation), ("half_load", half)):
        result.add_row(
            label,
            uploads=run_.plan["total"],
            lost=run_.lost,
            images_per_s=run_.throughput_per_s,
            p50_ms=run_.latency_ms.get("p50"),
            p95_ms=run_.latency_ms.get("p95"),
            p99_ms=run_.latency_ms.get("p99"),
            offered_per_s=run_.plan.get("rate_per_s"),
            startup_s=run_.startup_s,
            rss_mb=run_.rss_mb,
            cpu_cores=run_.cpu_cores,
        )
    result.params = {
        "replicas": 1,
        "batch_size_env": "SIEVE_MODERATOR_BATCH_SIZE",
        "moderator_batch_size": moderator_batch_size(),
        "runs": [asdict(saturation), asdict(half)],
    }
    return result.finish().to_dict()


if __name__ == "__main__":
    raise SystemExit(main_for("e2e", run))
