"""The one place a Verdict is built and banks decide over the model: the moderator (fast paths and the decided
batch) and re-judging (a bank added after the upload) publish verdicts that read the same way.

A bank match overrides the model: a match in a bank whose action is ``block`` blocks; matches only in ``review``
banks (watch lists) send the upload to a reviewer. The reasons name the bank (``bank_match:<bank>`` for a
blocking bank, ``bank_review:<bank>`` for a watch list; ``retroactive_bank_match:<bank>`` when the verdict
replaces an earlier one), and the evidence records each match with the bank's action.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from services.common.banks.store import BankAction, BankMatch
from services.common.schemas import (
    Action,
    BankMatchEvidence,
    DuplicateMatch,
    MatchEvidence,
    Verdict,
)


@dataclass(frozen=True)
class BankOutcome:
    action: Action
    reasons: list[str]  # the banks' reasons, to go before the model's
    evidence: list[BankMatchEvidence]
    watched: bool  # only watch lists matched: a reviewer must see the upload


def bank_reasons(matches: Sequence[BankMatch], retroactive: bool = False) -> list[str]:
    if retroactive:
        return [f"retroactive_bank_match:{m.bank}" for m in matches]
    return [f"bank_{'match' if m.action == 'block' else 'review'}:{m.bank}" for m in matches]


def over_model(model_action: Action, matches: Sequence[BankMatch], retroactive: bool = False) -> BankOutcome:
    """The action once the banks have spoken (the model's when nothing matched)."""
    if not matches:
        return BankOutcome(model_action, [], [], False)
    blocked = any(m.action == "block" for m in matches)
    action = Action.BLOCK if blocked or model_action is Action.BLOCK else Action.REVIEW
    evidence = [m.evidence() for m in matches]
    return BankOutcome(action, bank_reasons(matches, retroactive), evidence, not blocked)


def with_bank_action(match: BankMatch, action: BankAction) -> BankMatch:
    """A match found without its bank's policy at hand (re-judging reads it once per bank)."""
    return replace(match, action=action)


def build_verdict(
    upload_id: str,
    event_id: str,
    model_version: str,
    action: Action,
    reasons: list[str],
    *,
    duplicate_of: Sequence[DuplicateMatch] = (),
    flags: dict[str, float] | None = None,
    timings: dict[str, float] | None = None,
    evidence: Sequence[MatchEvidence] = (),
    bank_matches: Sequence[BankMatchEvidence] = (),
) -> Verdict:
    return Verdict(
        upload_id=upload_id,
        event_id=event_id,
        model_version=model_version or "none",
        action=action,
        duplicate_of=list(duplicate_of),
        flags=flags or {},
        reasons=reasons,
        timings=timings or {},
        evidence=list(evidence),
        bank_matches=list(bank_matches),
    )
