"""The README is the operator's reference: its first lines are the two commands, and its table is complete."""

from __future__ import annotations

import re
from pathlib import Path

from services.common.config import SETTINGS_GROUPS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_first_lines_are_the_two_commands() -> None:
    lines = [line for line in README.splitlines() if line.strip()][:3]
    assert "`make run`" in lines[1]
    assert "`make test`" in lines[2]


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"`(SIEVE_[A-Z0-9_]+)`", README))
    expected = {
        f"{cls.model_config['env_prefix']}{name.upper()}"
        for cls in SETTINGS_GROUPS.values()
        for name in cls.model_fields
    }
    assert expected - documented == set()


def test_ci_runs_the_readme_test_command() -> None:
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "make test" in ci
