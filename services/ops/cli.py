"""``sieve banks ...`` and ``sieve index ...``: what an admin runs by hand (the reviewer API offers the same)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import redis

from services.common.banks import HashBankStore, HashKind
from services.common.config import Settings
from services.common.hashing import informative_phash, phash_hex, sha256_hex
from services.common.imaging import decode_image


def _store(settings: Settings) -> HashBankStore:
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    return HashBankStore(client, settings.redis.key_prefix)


def image_hashes(path: Path, settings: Settings) -> list[tuple[HashKind, str]]:
    """The same hashes the moderator computes for an upload, so a banked file matches its re-uploads."""
    data = path.read_bytes()
    hashes: list[tuple[HashKind, str]] = [("sha256", sha256_hex(data))]
    phash = phash_hex(decode_image(data, settings.decode, settings.triton.input_size).pixels)
    if informative_phash(phash):
        hashes.append(("phash", phash))
    return hashes


def _cmd_banks(args: argparse.Namespace) -> int:
    settings = Settings()
    store = _store(settings)
    if args.action == "list":
        for bank in store.all_banks():
            print(json.dumps(bank.__dict__))
    elif args.action == "create":
        print(json.dumps(store.create(args.name, args.description or "").__dict__))
    elif args.action == "add":
        hashes = [h for f in args.files for h in image_hashes(Path(f), settings)]
        print(f"added {store.add_hashes(args.name, hashes)} hashes to {args.name}")
    elif args.action in ("enable", "disable"):
        print(json.dumps(store.set_enabled(args.name, args.action == "enable").__dict__))
    elif args.action == "remove":
        store.remove(args.name)
        print(f"removed {args.name}")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from services.common.index import SharedRecentIndex

    settings = Settings()
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    index = SharedRecentIndex(
        client, settings.redis.key_prefix, args.model_version, args.dim, settings.index.retention_s
    )
    kept = index.compact()
    print("another replica holds the compactor lock" if kept is None else f"snapshot written: {kept} entries")
    return 0


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("banks", help="manage hash banks of known violating content")
    p.add_argument("action", choices=["list", "create", "add", "enable", "disable", "remove"])
    p.add_argument("name", nargs="?")
    p.add_argument("files", nargs="*", help="images to bank (for add)")
    p.add_argument("--description", default=None)
    p.set_defaults(func=_cmd_banks)

    p = sub.add_parser("index", help="shared index maintenance")
    p.add_argument("action", choices=["compact"])
    p.add_argument("--model-version", required=True, help="e.g. sieve_embedder:1")
    p.add_argument("--dim", type=int, required=True)
    p.set_defaults(func=_cmd_index)
