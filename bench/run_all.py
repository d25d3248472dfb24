"""One command for the performance harness: every stage on the same machine in one run, JSON + Markdown.

    .venv/bin/python -m bench.run_all [--quick] [--only model,triton,e2e]

Writes bench/results/perf.json and bench/results/perf.md with the target ratios:
- end-to-end throughput >= 80% of the best in-process throughput of the same models (stage 2);
- p99 verdict latency at half load <= 3x the models' batch latency;
- decode + preprocess <= 15% of the per-image time budget at saturation;
- FAISS at 1M vectors: p99 < 2 ms with recall@1 >= 0.99.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from bench.common import RESULTS_DIR, ROOT, markdown_table, write_result
from services.common.stack import LocalStack


def _row(result: dict[str, Any], case: str) -> dict[str, Any]:
    return next((r for r in result.get("rows", []) if r.get("case") == case), {})


def _safe(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    began = time.monotonic()
    try:
        out = fn()
    except Exception as exc:  # one broken stage must not hide the others' numbers
        out = {"stage": name, "errors": [f"{type(exc).__name__}: {exc}"]}
    print(f"[run_all] {name} done in {time.monotonic() - began:.0f}s", flush=True)
    return out


def same_batch_ceiling(model: dict[str, Any], batch: int | None) -> dict[str, Any]:
    """Stage 2's fastest row for both models at the pipeline's own batch size (any backend, any threads)."""
    rows = [r for r in model.get("rows", []) if r.get("model") == "embedder+classifier" and r.get("batch") == batch]
    return max(rows, key=lambda r: r.get("images_per_s", 0.0), default={})


def ratios(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    model = stages.get("model", {})
    e2e = stages.get("e2e", {})
    sat, half = _row(e2e, "saturation"), _row(e2e, "half_load")
    best_any = model.get("summary", {}).get("ceiling", {}).get("embedder+classifier", {})
    # "The same model and batch": the in-process ceiling and batch latency at the moderators' batch size.
    ceiling = same_batch_ceiling(model, (e2e.get("params") or {}).get("moderator_batch_size")) or best_any
    best_inproc = ceiling.get("images_per_s")
    batch_ms = ceiling.get("batch_p50_ms")
    decode = stages.get("decode", {})
    decode_ms = decode.get("summary", {}).get("draft_reduce_ms_per_image")
    # The 1M-only rerun (``--only faiss_1m``, 11 minutes instead of the full stage's 36) wins when it is newer.
    candidates = [stages.get(k, {}) for k in ("faiss", "faiss_1m")]
    with_target = [c for c in candidates if c.get("summary", {}).get("target_1m")]
    newest = max(with_target, key=lambda c: str(c.get("started_at", "")), default={})
    faiss_1m = newest.get("summary", {}).get("target_1m", {})
    rows = []
    if best_inproc and sat.get("images_per_s"):
        rows.append(
            {
                "target": f"e2e throughput / in-process ceiling ({ceiling.get('case', '')})",
                "value": sat["images_per_s"] / best_inproc,
                "goal": ">= 0.80",
            }
        )
    if best_any.get("images_per_s") and sat.get("images_per_s") and best_any is not ceiling:
        rows.append(
            {
                "target": f"e2e throughput / best in-process at any batch (bs {best_any.get('batch')})",
                "value": sat["images_per_s"] / best_any["images_per_s"],
                "goal": "(for reference)",
            }
        )
    if batch_ms and half.get("p99_ms"):
        rows.append(
            {
                "target": f"p99 latency at half load / model batch latency (bs {ceiling.get('batch')})",
                "value": half["p99_ms"] / batch_ms,
                "goal": "<= 3",
            }
        )
    if decode_ms and sat.get("images_per_s"):
        budget_ms = 1000.0 / sat["images_per_s"]
        rows.append(
            {
                "target": "decode share of per-image budget at saturation",
                "value": decode_ms / budget_ms,
                "goal": "<= 0.15",
            }
        )
    if faiss_1m:
        rows.append(
            {
                "target": "FAISS 1M p99 ms (best of 3 passes) / recall@1",
                "value": f"{faiss_1m.get('p99_ms')} ({faiss_1m.get('p99_best_of_ms')}) / {faiss_1m.get('recall_at_1')}"
                f" ({faiss_1m.get('index')} {faiss_1m.get('setting')})",
                "goal": "< 2 ms / >= 0.99",
            }
        )
    return rows


STAGE_FILES = {
    "decode": "decode",
    "model": "model",
    "triton": "stage_triton",
    "e2e": "e2e",
    "faiss": "faiss",
    "faiss_1m": "faiss_1m",
    "peers": "peers",
}
# faiss_1m repeats the full faiss stage's 1M rows: run on request only.
DEFAULT_STAGES = [s for s in STAGE_FILES if s != "faiss_1m"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_STAGES),
        help="comma-separated stages to run now; the others are read from bench/results/<stage>.json and marked "
        "reused (each keeps its own machine state), e.g. --only model,triton,e2e after a pipeline change",
    )
    args = parser.parse_args(argv)
    from bench import peers, stage_decode, stage_e2e, stage_faiss, stage_model, stage_triton

    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(STAGE_FILES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGE_FILES)}")
    suffix = ".quick" if args.quick else ""
    stages: dict[str, dict[str, Any]] = {}

    def stage(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name in only:
            stages[name] = _safe(name, fn)
            write_result(STAGE_FILES[name] + suffix, stages[name])
            return
        previous = RESULTS_DIR / f"{STAGE_FILES[name]}{suffix}.json"
        if previous.exists():
            stages[name] = {**json.loads(previous.read_text()), "reused_from": str(previous.relative_to(ROOT))}

    stage("decode", lambda: stage_decode.run(quick=args.quick))
    stage("model", lambda: stage_model.run(quick=args.quick))
    if only & {"triton", "e2e"}:
        stack = LocalStack()
        stack.start()
        try:
            stage("triton", lambda: stage_triton.run(quick=args.quick, stack=stack))
            stage("e2e", lambda: stage_e2e.run(quick=args.quick, stack=stack))
        finally:
            stack.stop()
    else:
        stage("triton", dict)
        stage("e2e", dict)
    stage("faiss", lambda: stage_faiss.run(quick=args.quick))
    stage("faiss_1m", lambda: stage_faiss.run(quick=args.quick, sizes=(1_000_000,)))
    stage("peers", lambda: peers.run(quick=args.quick))
    table = ratios(stages)
    out = {"quick": args.quick, "stages": stages, "targets": table}
    name = "perf.quick" if args.quick else "perf"
    path = write_result(name, out)
    runs = [
        {
            "stage": k,
            "started_at": v.get("started_at", ""),
            "load_average_1_5_15": (v.get("machine") or {}).get("load_average_1_5_15", ""),
            "source": v.get("reused_from", "this run"),
        }
        for k, v in stages.items()
    ]
    (RESULTS_DIR / f"{name}.md").write_text(
        "# Sieve performance\n\n"
        + markdown_table(table, ["target", "value", "goal"])
        + "\n\n## Stages\n\n"
        + markdown_table(runs, ["stage", "started_at", "load_average_1_5_15", "source"])
        + "\n"
    )
    print(json.dumps(table, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
