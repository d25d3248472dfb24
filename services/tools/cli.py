"""``sieve explain A B`` and ``sieve dedup DIR``: registered by services/cli.py through ``add_subcommands``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path


def _cmd_explain(args: argparse.Namespace) -> int:
    from services.tools.explain import explain

    a, b = Path(args.a), Path(args.b)
    out = Path(args.out) if args.out else Path(f"explain-{a.stem}-vs-{b.stem}.png")
    if args.model_repo:
        result = explain(a, b, out, prefer_triton=False, repo=Path(args.model_repo))
    else:
        result = explain(a, b, out, prefer_triton=not args.no_triton)
    print(json.dumps(result.to_json(), indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_dedup(args: argparse.Namespace) -> int:
    from services.evaluation.embed import ServedEmbedder
    from services.tools.dedup import DedupOptions, default_near, run_dedup

    root = Path(args.dir)
    if not root.is_dir():
        print(f"{root} is not a folder", file=sys.stderr)
        return 2
    repo = Path(args.model_repo) if args.model_repo else None
    if repo is not None:
        embedder = ServedEmbedder.in_process(repo)
    else:
        embedder = ServedEmbedder.in_process() if args.no_triton else ServedEmbedder.connect()
    near, source = (args.near, "--near") if args.near is not None else default_near(embedder.model_version, repo)
    similar = args.similar if args.similar is not None else round(near - 0.10, 4)
    print(
        f"[dedup] {embedder.model_version} via {embedder.backend}; near {near:.4f} ({source}), similar {similar:.4f}",
        file=sys.stderr,
    )
    out = Path(args.out) if args.out else root.resolve().parent / f"{root.resolve().name}.sieve-dedup"
    options = DedupOptions(
        near=near,
        similar=similar,
        batch=args.batch,
        shard_size=args.shard_size,
        resume=args.resume,
        link_view=Path(args.link_view).resolve() if args.link_view else None,
        link_mode=args.link_mode,
        progress=not args.quiet,
    )
    # A scheduler's SIGTERM (batch job timeout, pod eviction) checkpoints like Ctrl-C before the process ends.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = run_dedup(root, out, options, embedder)
    except KeyboardInterrupt:
        return 130
    brief = {k: v for k, v in summary.items() if k != "failed"}
    brief["failed"] = len(summary["failed"])
    print(json.dumps(brief, indent=2))
    print(f"wrote {out / 'clusters.json'}, {out / 'clusters.csv'} and {out / 'report.html'}", file=sys.stderr)
    return 0


MODEL_REPO_HELP = (
    "an embedder repository to run in-process instead of the served one, e.g. a copy of "
    "model_repo/sieve_embedder holding a candidate version, to look at it before promoting it"
)


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("explain", help="why two images match: STN views, Grad-CAM, thresholds, classifier scores")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--out", default=None, help="a .png, or .html for a self-contained page (default: ./explain-*.png)")
    p.add_argument("--no-triton", action="store_true", help="use the served artifacts in-process even if Triton is up")
    p.add_argument("--model-repo", default=None, help=MODEL_REPO_HELP)
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("dedup", help="exact / near / similar duplicate clusters in a folder tree, with a report")
    p.add_argument("dir")
    p.add_argument("--out", default=None, help="output folder (default: DIR.sieve-dedup next to DIR)")
    p.add_argument(
        "--near",
        type=float,
        default=None,
        help="near-duplicate cosine (default: SIEVE_DECISION_DUPLICATE_THRESHOLD if set, else the "
        "served version's model card, else 0.90)",
    )
    p.add_argument("--similar", type=float, default=None, help="'similar' cosine, <= near (default: near - 0.10)")
    p.add_argument("--link-view", default=None, help="write a deduplicated view here (store/, tree/, refcounts.json)")
    p.add_argument("--link-mode", choices=("hard", "sym"), default="hard")
    p.add_argument("--resume", action="store_true", help="reuse the embedding checkpoints of an interrupted run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=1024, help="images per checkpoint shard")
    p.add_argument("--no-triton", action="store_true", help="embed in-process even if Triton is up")
    p.add_argument("--model-repo", default=None, help=MODEL_REPO_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_dedup)
