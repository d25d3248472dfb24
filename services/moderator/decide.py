"""Pure decision logic: scores and neighbours in, action and reasons out. No I/O, so it is unit-tested alone."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.config import DecisionSettings
from services.common.index.base import Neighbour
from services.common.schemas import Action, DuplicateMatch, ReviewReason


@dataclass(frozen=True)
class Decision:
    action: Action
    duplicate_of: list[DuplicateMatch]
    flags: dict[str, float]
    reasons: list[str]
    review_reason: ReviewReason | None = None
    review_priority: float = 0.0
    neighbours: list[DuplicateMatch] = field(default_factory=list)


def decide(
    neighbours: list[Neighbour],
    scores: dict[str, float],
    cfg: DecisionSettings,
    neighbour_actions: Mapping[str, str] | None = None,
) -> Decision:
    """Duplicates are reported, not blocked on their own; flags block; uncertainty goes to review.

    ``neighbour_actions`` are the earlier verdicts of the neighbours: a near-duplicate of blocked content that the
    classifier lets through (or the reverse) is a disagreement worth a human label.
    """
    nearest = [DuplicateMatch(upload_id=n.upload_id, score=round(n.score, 6)) for n in neighbours]
    duplicates = [m for m in nearest if m.score >= cfg.duplicate_threshold]
    flags = {c: round(s, 6) for c, s in scores.items()}
    reasons: list[str] = []
    action = Action.ALLOW
    review_reason: ReviewReason | None = None
    priority = 0.0

    for match in duplicates:
        reasons.append(f"near_duplicate:{match.upload_id}:{match.score:.3f}")

    blocking = {c: s for c, s in scores.items() if c in cfg.block_categories and s >= cfg.flag_threshold}
    for category, score in sorted(blocking.items()):
        reasons.append(f"classifier_flag:{category}:{score:.3f}")
    if blocking:
        action = Action.BLOCK

    uncertain = {c: s for c, s in scores.items() if cfg.flag_review_low <= s < cfg.flag_threshold}
    best = nearest[0].score if nearest else 0.0
    near_threshold = abs(best - cfg.duplicate_threshold) < cfg.review_margin

    if action is not Action.BLOCK:
        if uncertain:
            review_reason = ReviewReason.UNCERTAIN_FLAG
            # Closest to the middle of the band is the most informative label.
            mid = (cfg.flag_review_low + cfg.flag_threshold) / 2
            half = (cfg.flag_threshold - cfg.flag_review_low) / 2 or 1.0
            priority = max(1.0 - abs(s - mid) / half for s in uncertain.values())
            reasons.extend(f"uncertain_flag:{c}:{s:.3f}" for c, s in sorted(uncertain.items()))
        elif near_threshold:
            review_reason = ReviewReason.NEAR_THRESHOLD_DUPLICATE
            priority = 1.0 - abs(best - cfg.duplicate_threshold) / cfg.review_margin
            reasons.append(f"near_threshold_duplicate:{best:.3f}")
        if review_reason is not None:
            action = Action.REVIEW

    blocked_twins = [m for m in duplicates if (neighbour_actions or {}).get(m.upload_id) == Action.BLOCK.value]
    allowed_twins = [m for m in duplicates if (neighbour_actions or {}).get(m.upload_id) == Action.ALLOW.value]
    if review_reason is None and ((blocked_twins and action is not Action.BLOCK) or (allowed_twins and blocking)):
        review_reason = ReviewReason.DISAGREEMENT
        priority = 1.0
        twin = (blocked_twins or allowed_twins)[0]
        reasons.append(f"disagrees_with:{twin.upload_id}")
        if action is Action.ALLOW:
            action = Action.REVIEW  # a blocked image, edited and re-uploaded, must not pass unseen

    if not reasons:
        reasons.append("no_match")
    return Decision(
        action=action,
        duplicate_of=duplicates,
        flags=flags,
        reasons=reasons,
        review_reason=review_reason,
        review_priority=round(priority, 4),
        neighbours=nearest,
    )
