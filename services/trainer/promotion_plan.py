"""Whether an admin's promotion request can run, decided from what is installed, staged and serving.

Kept free of I/O so every refusal an admin can meet is tested by itself. Triton serves only the newest installed
version of a model ("latest 1"), so a request can only move the model forward: going back is a rollback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RepositoryView:
    """One model as the trainer finds it: folders on disk, candidates staged for admins, and Triton's choice."""

    model: str
    known: bool
    installed: tuple[int, ...]
    staged: tuple[int, ...]
    serving: int | None


@dataclass(frozen=True)
class Plan:
    version: int
    source: Literal["staged", "installed"]
    serving: int


@dataclass(frozen=True)
class Refusal:
    reason: str


def plan(version_text: str, view: RepositoryView) -> Plan | Refusal:
    """The promotion to run, or why not."""
    if not view.known:
        return Refusal(f"unknown model {view.model!r}: the model repository has no such model")
    if not version_text.isdigit():
        return Refusal(f"version {version_text!r} is not a version number")
    version = int(version_text)
    if view.serving is None:
        return Refusal(f"{view.model} is not loaded in Triton, so there is no serving version to promote from")
    if version == view.serving:
        return Refusal(f"version {version} of {view.model} is already serving")
    newest = max(view.installed, default=0)
    if version in view.installed:
        if version < view.serving:
            return Refusal(
                f"version {version} is older than the serving version {view.serving}: use `sieve trainer rollback`"
            )
        if version != newest:
            return Refusal(f"version {version} is installed, but {newest} is newer and Triton would serve that")
        return Plan(version, "installed", view.serving)
    if version in view.staged:
        if version <= newest:
            return Refusal(f"staged version {version} would not be the newest installed one ({newest} is)")
        return Plan(version, "staged", view.serving)
    return Refusal(f"version {version} of {view.model} is neither installed nor staged as a candidate")
