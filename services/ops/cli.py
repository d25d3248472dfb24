"""``sieve banks ...`` and ``sieve index ...``: what an admin runs by hand (the reviewer API offers the same)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from services.common.audit import AuditLog
from services.common.banks import HashBankStore, MalformedSignal, Signal, parse_signal
from services.common.banks.exchange import FORMATS, ListFormat, guess_format, read_source
from services.common.banks.operations import BankOperations
from services.common.banks.signals import SIGNAL_TYPES
from services.common.banks.store import BANK_ACTIONS, Bank
from services.common.config import Settings
from services.common.redis_client import connect

REJUDGE_LOCK_WAIT_S = 600.0  # one step of the reviewer's worker holds the bank's lock for at most this


def _store(settings: Settings) -> HashBankStore:
    # Imports and re-embedding move large lists: a longer command timeout than the services', never none.
    return HashBankStore.configured(connect(settings.redis, timeout_s=60.0), settings.redis.key_prefix, settings.banks)


def _signal_args(values: list[str]) -> list[Signal]:
    """``--signal pdq:<hex>`` (or ``pdq <hex>``) arguments; raises MalformedSignal."""
    out = []
    for text in values:
        kind, sep, value = text.replace(" ", ":", 1).partition(":")
        if not sep:
            raise MalformedSignal(f"expected <signal_type>:<value>, got {text!r}")
        out.append(parse_signal(kind, value))
    return out


def _ops(store: HashBankStore, settings: Settings, embedder: bool = False) -> BankOperations:
    """The same operations the reviewer's admin API runs, with the same audit writer and sink."""
    models = None
    if embedder:
        from services.common.inference import TritonModels

        models = TritonModels(settings.triton)
    return BankOperations(store, AuditLog(store.client, store.prefix, settings.audit.file), settings, models)


def _need_name(args: argparse.Namespace) -> str:
    if not args.name:
        raise SystemExit(f"sieve banks {args.action}: a bank name is needed")
    return str(args.name)


def _print(value: object) -> None:
    print(json.dumps(value.__dict__ if isinstance(value, Bank) else value))


def _cmd_banks(args: argparse.Namespace) -> int:
    settings = Settings()
    store = _store(settings)
    action = args.action
    actor = f"cli:{args.actor}"
    if action == "list":
        for bank in [store.get(args.name)] if args.name else store.all_banks():
            _print(bank)
        return 0
    name = _need_name(args)
    ops = _ops(store, settings, embedder=(action == "add" and args.embed and bool(args.files)) or action == "reembed")
    if action == "create":
        _print(ops.create(name, args.description or "", args.bank_action or "block", actor))
    elif action == "action":
        if args.bank_action is None:
            raise SystemExit("sieve banks action NAME --action block|review")
        _print(ops.set_action(name, args.bank_action, actor))
    elif action == "add":
        report: dict[str, object] = {"bank": name}
        if args.files:
            report.update(ops.add_images(name, [Path(f).read_bytes() for f in args.files], actor, embed=args.embed))
            if args.embed and not report["embedded_with"]:
                print("warning: embeddings not banked (no embedder reachable); hashes were", file=sys.stderr)
        if args.signal:
            report.update(ops.add_signals(name, _signal_args(args.signal), actor))
        _print(report)
        if args.rejudge:
            _rejudge(store, settings, args, name, until_done=True)
    elif action == "reembed":
        _print(ops.reembed([b.name for b in store.all_banks()] if name == "all" else [name], actor))
    elif action == "rejudge":
        _rejudge(store, settings, args, name, args.until_done)
    elif action == "threshold":
        _print(ops.set_threshold(name, None if args.threshold is None else float(args.threshold), actor))
    elif action in ("enable", "disable"):
        _print(ops.set_enabled(name, action == "enable", actor))
    elif action == "remove":
        if args.signal:
            _print({"bank": name, **ops.remove_signals(name, _signal_args(args.signal), actor)})
        elif ops.delete(name, actor):
            print(f"removed {name}")
    elif action == "import":
        return _import(store, settings, ops, args, name)
    elif action == "export":
        text = ops.export(name, args.format or "te", args.signal_type, actor)
        if args.output:
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
    return 0


def _rejudge(store: HashBankStore, settings: Settings, args: argparse.Namespace, name: str, until_done: bool) -> None:
    """Re-verdicts recent uploads matching what the bank gained since the last run, printing progress per step."""
    from services.common.banks.rejudging import Rejudger, kafka_publisher

    judge = Rejudger(store.client, settings, kafka_publisher(settings))
    while True:
        lock = judge.lock(name)
        if not lock.acquire(blocking=True, blocking_timeout=REJUDGE_LOCK_WAIT_S):
            raise SystemExit(f"bank {name} is being re-judged by another process; try again later")
        try:
            progress = judge.run(name, max_signals=args.max_signals)
        finally:
            lock.release()
        print(json.dumps({"rejudge": progress.__dict__}), flush=True)
        AuditLog(store.client, store.prefix, settings.audit.file).record(
            "bank_rejudged", f"cli:{args.actor}", name, progress.__dict__
        )
        if progress.done or not until_done:
            return


def _import(store: HashBankStore, settings: Settings, ops: BankOperations, args: argparse.Namespace, name: str) -> int:
    """Prints the report (counts, and every malformed row) as JSON; exit status 2 when any row was malformed."""
    if len(args.files) != 1:
        raise SystemExit("sieve banks import NAME FILE_OR_URL")
    source = args.files[0]
    text = read_source(source, settings.fetch, settings.banks.import_max_bytes)
    fmt: ListFormat = args.format or guess_format(text, source)
    if args.create:
        ops.create(
            name, args.description or f"imported from {source}", args.bank_action or "block", f"cli:{args.actor}"
        )
    report = ops.import_list(name, text, fmt, source, f"cli:{args.actor}")
    print(json.dumps(report.as_dict(), indent=1))
    if args.rejudge:
        _rejudge(store, settings, args, name, until_done=True)
    return 2 if report.malformed else 0


def _cmd_index(args: argparse.Namespace) -> int:
    from services.common.index import FaissRedisIndex

    settings = Settings()
    if settings.index.backend != "faiss":
        print(f"the {settings.index.backend} backend keeps no snapshot: nothing to compact")
        return 0
    client = connect(settings.redis, timeout_s=60.0)
    index = FaissRedisIndex(client, settings.redis.key_prefix, args.model_version, args.dim, settings.index.retention_s)
    kept = index.compact()
    print("another replica holds the compactor lock" if kept is None else f"snapshot written: {kept} entries")
    return 0


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("banks", help="manage hash banks of known violating content")
    p.add_argument(
        "action",
        choices=[
            "list",
            "create",
            "add",
            "enable",
            "disable",
            "remove",
            "import",
            "export",
            "reembed",
            "threshold",
            "action",
            "rejudge",
        ],
    )
    p.add_argument("name", nargs="?")
    p.add_argument("files", nargs="*", help="images to bank (add), or the list's file or URL (import)")
    p.add_argument("--description", default=None)
    p.add_argument("--signal", action="append", default=[], help="add/remove one signal, e.g. pdq:<64 hex>")
    p.add_argument("--format", choices=FORMATS, default=None, help="te or csv (import guesses when left out)")
    p.add_argument("--signal-type", choices=SIGNAL_TYPES, default=None, help="export only this signal type")
    p.add_argument("--output", default=None, help="export to this file instead of stdout")
    p.add_argument("--create", action="store_true", help="import: create the bank when it does not exist")
    p.add_argument("--max-signals", type=int, default=100_000, help="rejudge: banked signals searched per step")
    p.add_argument("--rejudge", action="store_true", help="add/import: then re-judge recent uploads (rejudge)")
    p.add_argument("--until-done", action="store_true", help="rejudge: keep stepping until the bank is done")
    p.add_argument("--no-embed", dest="embed", action="store_false", help="add: bank hashes only, no embedding")
    p.add_argument("--threshold", default=None, help="threshold: the bank's own embedding cosine (none: default)")
    p.add_argument(
        "--action",
        dest="bank_action",
        choices=BANK_ACTIONS,
        default=None,
        help="create/import --create/action: what a match does: block (default) or review (send to human review)",
    )
    p.add_argument("--actor", default=os.environ.get("USER", "operator"), help="who the audit log records")
    p.set_defaults(func=_cmd_banks)

    p = sub.add_parser("index", help="shared index maintenance")
    p.add_argument("action", choices=["compact"])
    p.add_argument("--model-version", required=True, help="e.g. sieve_embedder:1")
    p.add_argument("--dim", type=int, required=True)
    p.set_defaults(func=_cmd_index)
