from services.common.config import DecisionSettings
from services.common.index import Neighbour
from services.common.schemas import Action, ReviewReason
from services.moderator.decide import decide

CFG = DecisionSettings(
    duplicate_threshold=0.8, review_margin=0.05, flag_threshold=0.8, flag_review_low=0.4, block_categories=["nsfw"]
)


def test_clear_duplicate_is_reported_and_allowed() -> None:
    d = decide([Neighbour("a", 0.97), Neighbour("b", 0.5)], {"nsfw": 0.01}, CFG)
    assert d.action is Action.ALLOW
    assert [m.upload_id for m in d.duplicate_of] == ["a"]
    assert d.review_reason is None
    assert any(r.startswith("near_duplicate:a:") for r in d.reasons)


def test_no_neighbours_is_allowed_with_a_reason() -> None:
    d = decide([], {"nsfw": 0.0}, CFG)
    assert d.action is Action.ALLOW
    assert d.duplicate_of == []
    assert d.reasons == ["no_match"]


def test_flag_above_threshold_blocks() -> None:
    d = decide([], {"nsfw": 0.93}, CFG)
    assert d.action is Action.BLOCK
    assert d.reasons == ["classifier_flag:nsfw:0.930"]


def test_non_blocking_category_does_not_block() -> None:
    d = decide([], {"spam": 0.99}, CFG)
    assert d.action is Action.ALLOW


def test_uncertain_flag_goes_to_review_with_priority_highest_mid_band() -> None:
    mid = decide([], {"nsfw": 0.6}, CFG)
    edge = decide([], {"nsfw": 0.42}, CFG)
    assert mid.action is Action.REVIEW and mid.review_reason is ReviewReason.UNCERTAIN_FLAG
    assert mid.review_priority > edge.review_priority


def test_similarity_near_threshold_goes_to_review() -> None:
    below = decide([Neighbour("a", 0.78)], {"nsfw": 0.0}, CFG)
    above = decide([Neighbour("a", 0.81)], {"nsfw": 0.0}, CFG)
    assert below.action is Action.REVIEW and below.duplicate_of == []
    assert above.action is Action.REVIEW and [m.upload_id for m in above.duplicate_of] == ["a"]
    assert below.review_reason is ReviewReason.NEAR_THRESHOLD_DUPLICATE


def test_far_below_threshold_is_not_a_duplicate() -> None:
    d = decide([Neighbour("a", 0.5)], {"nsfw": 0.0}, CFG)
    assert d.action is Action.ALLOW and d.duplicate_of == []
    assert [n.upload_id for n in d.neighbours] == ["a"]


def test_near_duplicate_of_blocked_content_goes_to_review_as_disagreement() -> None:
    d = decide([Neighbour("banned", 0.97)], {"nsfw": 0.05}, CFG, {"banned": "block"})
    assert d.action is Action.REVIEW
    assert d.review_reason is ReviewReason.DISAGREEMENT and d.review_priority == 1.0
    assert "disagrees_with:banned" in d.reasons


def test_blocked_item_whose_twin_was_allowed_stays_blocked_but_is_reviewed() -> None:
    d = decide([Neighbour("fine", 0.97)], {"nsfw": 0.95}, CFG, {"fine": "allow"})
    assert d.action is Action.BLOCK
    assert d.review_reason is ReviewReason.DISAGREEMENT


def test_agreeing_twin_is_no_disagreement() -> None:
    d = decide([Neighbour("fine", 0.97)], {"nsfw": 0.05}, CFG, {"fine": "allow"})
    assert d.action is Action.ALLOW and d.review_reason is None
