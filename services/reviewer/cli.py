"""``sieve reviewer serve``: the reviewer HTTP service under uvicorn (registered by services/cli.py)."""

from __future__ import annotations

import argparse
import os


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from services.common.telemetry import setup_logging
    from services.reviewer.settings import ReviewerSettings

    setup_logging(args.log_level)
    rsettings = ReviewerSettings()
    uvicorn.run(
        "services.reviewer.app:app_from_env",
        factory=True,
        host=args.host or rsettings.host,
        port=args.port if args.port is not None else rsettings.port,
        log_config=None,  # keep the JSON log format set up above
        access_log=args.access_log,
        proxy_headers=False,
        server_header=False,
    )
    return 0


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("reviewer", help="the human review service (queue, labelling page, feedback)")
    reviewer_sub = parser.add_subparsers(dest="reviewer_command", required=True)
    p = reviewer_sub.add_parser("serve", help="serve the reviewer API and page (configured by SIEVE_* variables)")
    p.add_argument("--host", default=None, help="bind address (default SIEVE_REVIEWER_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default SIEVE_REVIEWER_PORT, 8080)")
    p.add_argument("--log-level", default=os.environ.get("SIEVE_LOG_LEVEL", "INFO"))
    p.add_argument("--access-log", action="store_true", help="log each request (paths only; never headers)")
    p.set_defaults(func=_cmd_serve)
