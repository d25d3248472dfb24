"""Rules shared by the deployment-artifact tests: which SIEVE_* variables the code reads, which commands exist.

Not a test module (pytest collects only test_*.py); the tests import it from their own folder.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

from services.cli import build_parser
from services.common.config import SETTINGS_GROUPS

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ROOT / "services"

# SIEVE_* variables read straight from os.environ (not through a settings class), found in the code by this.
_ENV_READ = re.compile(r"""(?:environ\.get|getenv|environ\[|environ\.setdefault)\(?\s*["'](SIEVE_[A-Z0-9_]+)["']""")


def settings_env_names(cls: type[BaseSettings]) -> set[str]:
    """The environment variables one settings class reads: its env_prefix plus each field's name, upper-cased."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            continue  # a nested group (Settings.kafka): read through its own class and prefix
        names.add(f"{prefix}{name}".upper())
    return names


def _service_settings_classes() -> list[type[BaseSettings]]:
    """BaseSettings classes defined in services' own settings modules (services/<svc>/settings.py)."""
    classes: list[type[BaseSettings]] = []
    for path in sorted(SERVICES.glob("*/settings.py")):
        module_name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseSettings)
                and value is not BaseSettings
                and value.__module__ == module_name
            ):
                classes.append(value)
    return classes


def direct_env_reads() -> set[str]:
    names: set[str] = set()
    for path in SERVICES.rglob("*.py"):
        names.update(_ENV_READ.findall(path.read_text()))
    return names


def known_env_names() -> set[str]:
    """Every SIEVE_* variable the code reads: the config groups, services' settings classes, direct reads."""
    names: set[str] = set()
    for cls in [*SETTINGS_GROUPS.values(), *_service_settings_classes()]:
        names |= settings_env_names(cls)
    return names | direct_env_reads()


def unknown_sieve_names(names: Iterable[str], known: set[str]) -> list[str]:
    """The SIEVE_* names among `names` that no code reads (compared upper-case, as pydantic-settings does)."""
    return sorted(n for n in names if n.upper().startswith("SIEVE_") and n.upper() not in known)


def _subcommand_names(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def check_sieve_command(argv: Sequence[str]) -> str:
    """'parsed' when `sieve`'s own argument parser accepts argv; every subcommand the artifacts run has shipped.

    Raises AssertionError otherwise, with what went wrong.
    """
    assert list(argv[:1]) == ["sieve"], f"expected a `sieve ...` command, got {list(argv)}"
    args = list(argv[1:])
    assert args, "`sieve` needs a subcommand"
    parser = build_parser()
    assert args[0] in _subcommand_names(parser), (
        f"`sieve {' '.join(args)}`: {args[0]!r} is not a sieve subcommand (have {sorted(_subcommand_names(parser))})"
    )
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"`sieve {' '.join(args)}` is rejected by sieve's argument parser") from exc
    return "parsed"


def dockerfile_stages(text: str) -> dict[str, str]:
    """Stage name -> base image of a Dockerfile, with ARG defaults declared before the first FROM substituted."""
    args: dict[str, str] = {}
    stages: dict[str, str] = {}
    logical = re.sub(r"\\\n", " ", text)
    for line in logical.splitlines():
        line = line.strip()
        if m := re.match(r"ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)$", line):
            if not stages:
                args[m.group(1)] = m.group(2)
        elif m := re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)$", line, flags=re.IGNORECASE):
            base = re.sub(r"\$\{(\w+)\}", lambda g: args.get(g.group(1), g.group(0)), m.group(1))
            stages[m.group(2)] = base
    return stages


def as_mapping(value: Any) -> dict[str, Any]:
    assert isinstance(value, dict), f"expected a mapping, got {type(value).__name__}: {value!r}"
    return value
