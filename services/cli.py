"""The ``sieve`` command: one entry point for the stack, the services and the tools."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from services.common.config import Settings


def _cmd_stack(args: argparse.Namespace) -> int:
    from services.common.stack import LocalStack

    stack = LocalStack(with_triton=not args.no_triton, brokers=args.brokers, index=args.index)
    stopped = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopped
        stopped = True

    # Installed before the "running" line, so a signal that follows that line at once is not lost. Started in
    # the background (nohup, CI), SIGINT is ignored until this handler replaces that: one sent in the gap left
    # the stack running with its parent asleep in the loop below.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        endpoints = stack.start()
        print(json.dumps(endpoints.__dict__, indent=2))
        print("export " + " ".join(f"{k}={v}" for k, v in endpoints.env().items()))
        print("[stack] running; Ctrl-C to stop", flush=True)
        while not stopped:
            time.sleep(0.5)
    finally:
        stack.stop()
    return 0


def _cmd_moderator(args: argparse.Namespace) -> int:
    from services.common.telemetry import setup_logging, setup_telemetry
    from services.moderator.service import Moderator

    settings = Settings()
    setup_logging(args.log_level)
    setup_telemetry(settings.telemetry, "sieve-moderator")
    moderator = Moderator(settings)
    moderator.install_signal_handlers()
    moderator.run(idle_exit_s=args.idle_exit)
    return 0


def _cmd_produce(args: argparse.Namespace) -> int:
    from services.common.uploads import UploadPublisher, event_for_file, images_in

    files = images_in(Path(args.folder))
    count = UploadPublisher(Settings().kafka).publish(event_for_file(f) for f in files)
    print(f"published {count} upload events")
    return 0


def _cmd_schemas(args: argparse.Namespace) -> int:
    from services.common.schema_files import check_schema_files, write_schema_files

    if args.check:
        drift = check_schema_files()
        for line in drift:
            print(line, file=sys.stderr)
        return 1 if drift else 0
    for path in write_schema_files():
        print(f"wrote {path}")
    return 0


def _cmd_config(_args: argparse.Namespace) -> int:
    from services.common.config import settings_table

    print("| variable | default |\n|---|---|")
    for name, default in settings_table():
        print(f"| `{name}` | `{default}` |")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from services.demo import run_demo

    return run_demo(originals=args.originals, copies_per=args.copies, follow=args.follow)


def _cmd_photos(args: argparse.Namespace) -> int:
    from services.common.photos.build import build_photo_set, default_photo_dir

    manifest = build_photo_set(Path(args.out) if args.out else default_photo_dir())
    print(f"{len(manifest.images)} photos: {manifest.counts()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sieve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start Kafka, Redis and Triton (and Milvus: --index milvus) locally and wait")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument(
        "--index",
        choices=("faiss", "milvus"),
        default=None,
        help="the recent-images index backend (default: SIEVE_INDEX_BACKEND); milvus starts a Milvus server too",
    )
    p.add_argument(
        "--brokers",
        type=int,
        choices=(1, 3),
        default=1,
        help="Kafka nodes: 1, or 3 for a KRaft cluster with replication factor 3 and min.insync.replicas 2",
    )
    p.set_defaults(func=_cmd_stack)

    p = sub.add_parser("moderator", help="run the moderator service (configured by SIEVE_* variables)")
    p.add_argument("--log-level", default=os.environ.get("SIEVE_LOG_LEVEL", "INFO"))
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    p.set_defaults(func=_cmd_moderator)

    p = sub.add_parser("produce", help="publish one upload event per image in a folder")
    p.add_argument("folder")
    p.set_defaults(func=_cmd_produce)

    p = sub.add_parser("schemas", help="write (or --check) the JSON Schema files in schemas/")
    p.add_argument("--check", action="store_true")
    p.set_defaults(func=_cmd_schemas)

    p = sub.add_parser("config", help="print every SIEVE_* setting and its default (the README table)")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("demo", help="start the stack, run the moderator and feed it sample photos")
    p.add_argument("--originals", type=int, default=40)
    p.add_argument("--copies", type=int, default=2, help="near-duplicates planted per chosen original")
    p.add_argument("--follow", action="store_true", help="keep running after the sample stream")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("photos", help="build the real-photo set from Debian packages and scikit-image")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_photos)

    for module in PLUGIN_MODULES:
        _register_plugin(module, sub)
    return parser


# Services that add their own subcommands: each module defines add_subcommands(subparsers).
PLUGIN_MODULES = (
    "services.trainer.cli",
    "services.trainer.job_cli",
    "services.evaluation.cli",
    "services.reviewer.cli",
    "services.tools.cli",
    "services.ops.cli",
)


def _register_plugin(module: str, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    import importlib
    import importlib.util

    if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None or importlib.util.find_spec(module) is None:
        return
    importlib.import_module(module).add_subcommands(sub)


TRAIN_EXTRA_HINT = (
    "sieve {command} needs torch, which the serving install leaves out: pip install -e '.[train]' "
    "(make setup-test installs it; in containers, the trainer image has it)"
)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "torch":
            raise
        words = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")]
        print(TRAIN_EXTRA_HINT.format(command=words[0] if words else "this command"), file=sys.stderr)
        return 3
    return result


if __name__ == "__main__":
    raise SystemExit(main())
