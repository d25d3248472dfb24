"""``sieve trainer run | status | rollback | promotions``: the retraining job, its rollback, admin requests.

``run`` serves admin promotion requests between feedback polls; ``promotions`` runs the ones waiting now and
exits, for a deployment that does not keep the job running.
"""

from __future__ import annotations

import argparse
import json
import sys

from services.common.config import Settings


def _cmd(args: argparse.Namespace) -> int:
    from services.common.telemetry import setup_logging
    from services.trainer.job import RetrainingJob, status
    from services.trainer.promotion import ModelRepository, rollback

    settings = Settings()
    setup_logging()
    if args.action == "run":
        RetrainingJob(settings).run(max_iterations=args.iterations)
    elif args.action == "status":
        print(json.dumps(status(settings), indent=2, default=str))
    elif args.action == "promotions":
        from services.common.redis_client import connect
        from services.trainer.job import promotion_consumer

        client = connect(settings.redis, timeout_s=60.0)
        done = promotion_consumer(settings, client).drain()
        print(json.dumps([r.model_dump(mode="json") for r in done], indent=2))
    elif args.action == "rollback":
        repo = ModelRepository(settings.stack.model_repo)
        try:
            version = rollback(settings, repo, settings.trainer.workdir / "promotions.jsonl", args.reason)
        except RuntimeError as exc:  # nothing to roll back to: say so, not with a traceback
            print(f"sieve trainer rollback: {exc}", file=sys.stderr)
            return 1
        print(f"serving version {version}")
    return 0


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("trainer", help="the retraining job: consume feedback, fine-tune, gate, promote")
    p.add_argument(
        "action",
        choices=["run", "status", "rollback", "promotions"],
        help="promotions: run the admin promotion requests waiting now, then exit",
    )
    p.add_argument("--iterations", type=int, default=None, help="stop after this many polls (default: forever)")
    p.add_argument("--reason", default="manual", help="recorded with a rollback")
    p.set_defaults(func=_cmd)
