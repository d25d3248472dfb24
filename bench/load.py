"""Load benchmark: a sustained stream of ≥ 20,000 uploads at saturation, with 1 and 2 (and 4) replicas.

    .venv/bin/python -m bench.load [--model-path 2000 --exact 18000 --bad 200 --replicas 1 2]

Writes bench/results/load.json. The stream mixes distinct photos (model path), byte-identical re-uploads (the
sha256 fast path) and corrupt files (the DLQ path); the mix is in the JSON so nobody mistakes one for another.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from bench.stream import StreamPlan, prepare_images, run_stream
from services.common.config import REPO_ROOT
from services.common.stack import LocalStack

RESULTS = REPO_ROOT / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", type=int, default=2000)
    parser.add_argument("--exact", type=int, default=18000)
    parser.add_argument("--bad", type=int, default=200)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(RESULTS / "load.json"))
    args = parser.parse_args(argv)

    images = prepare_images(REPO_ROOT / "var" / "bench" / "load-images", args.model_path)
    results = []
    stack = LocalStack()
    endpoints = stack.start()
    try:
        for replicas in args.replicas:
            plan = StreamPlan(args.model_path, args.exact, args.bad)
            result = run_stream(stack, endpoints, plan, replicas, images, f"load-r{replicas}")
            print(json.dumps({k: v for k, v in asdict(result).items() if k != "lag_samples"}), flush=True)
            results.append(asdict(result))
    finally:
        stack.stop()
    out = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "runs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(r["lost"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
