"""Banks over the model, in the one place verdicts are built: block wins, watch lists send to review."""

from __future__ import annotations

from services.common.banks.store import BankMatch
from services.common.schemas import Action
from services.common.verdicts import build_verdict, over_model, with_bank_action

BLOCKING = BankMatch("known-bad", "pdq", 3, "item-1", "ab" * 32, action="block")
WATCHING = BankMatch("watch", "embedding", 0.2, "item-2", "", score=0.83, inliers=40, action="review")


def test_no_match_leaves_the_model_alone() -> None:
    outcome = over_model(Action.ALLOW, [])
    assert (outcome.action, outcome.reasons, outcome.evidence, outcome.watched) == (Action.ALLOW, [], [], False)


def test_a_blocking_bank_blocks_whatever_else_matched() -> None:
    outcome = over_model(Action.ALLOW, [WATCHING, BLOCKING])
    assert outcome.action is Action.BLOCK and not outcome.watched
    assert outcome.reasons == ["bank_review:watch", "bank_match:known-bad"]
    assert [(e.bank, e.action, e.inliers) for e in outcome.evidence] == [
        ("watch", "review", 40),
        ("known-bad", "block", None),
    ]


def test_a_watch_list_sends_to_review_unless_the_model_blocks() -> None:
    assert over_model(Action.ALLOW, [WATCHING]).action is Action.REVIEW
    assert over_model(Action.ALLOW, [WATCHING]).watched
    assert over_model(Action.BLOCK, [WATCHING]).action is Action.BLOCK


def test_re_judging_names_the_bank_and_records_its_policy() -> None:
    found = BankMatch("late", "sha256", 0, "item-3", "c" * 64)  # re-judging finds it before reading the policy
    outcome = over_model(Action.ALLOW, [with_bank_action(found, "review")], retroactive=True)
    assert outcome.action is Action.REVIEW and outcome.reasons == ["retroactive_bank_match:late"]
    assert outcome.evidence[0].action == "review"
    verdict = build_verdict("u", "e", "", outcome.action, outcome.reasons, bank_matches=outcome.evidence)
    assert verdict.model_version == "none" and verdict.bank_matches[0].bank == "late" and verdict.flags == {}
