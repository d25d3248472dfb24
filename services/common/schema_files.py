"""Keeps schemas/ in step with the pydantic models: written by ``sieve schemas``, checked by a test and CI."""

from __future__ import annotations

import json
from pathlib import Path

from services.common.config import REPO_ROOT
from services.common.schemas import json_schemas

SCHEMA_DIR = REPO_ROOT / "schemas"


def _render(schema: dict[str, object]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schema_files(folder: Path = SCHEMA_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = folder / name
        path.write_text(_render(schema))
        written.append(path)
    return written


def check_schema_files(folder: Path = SCHEMA_DIR) -> list[str]:
    """Lines describing every drift between the models and the checked-in files; empty when in step."""
    problems = []
    for name, schema in json_schemas().items():
        path = folder / name
        if not path.exists():
            problems.append(f"missing {path}: run `sieve schemas`")
        elif path.read_text() != _render(schema):
            problems.append(f"{path} differs from the pydantic model: run `sieve schemas` and bump the version")
    return problems
