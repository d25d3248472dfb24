"""Active-learning selection against the real Redis: reach ordering, diversity and the shared budget."""

from __future__ import annotations

import redis

from services.common.config import ReviewSelectionSettings, Settings
from services.common.schemas import DuplicateMatch
from services.moderator.active_learning import Candidate, ReviewSelector


def _selector(settings: Settings, budget: int) -> ReviewSelector:
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    return ReviewSelector(client, settings.redis.key_prefix, ReviewSelectionSettings(budget_per_minute=budget))


def test_reach_raises_priority_and_budget_caps_requests(settings: Settings) -> None:
    selector = _selector(settings, budget=2)
    out = selector.select(
        [
            Candidate("quiet", 0.9, [], {}),
            Candidate("viral", 0.5, [], {"reach": 1_000_000}),
            Candidate("mid", 0.6, [], {"reach": 1}),  # 0.6 x 1.30 < 0.9
        ],
        now=1000.0,
    )
    assert [c.upload_id for c in out] == ["viral", "quiet", "mid"]
    assert [c.selected for c in out] == [True, True, False]
    assert out[2].skipped_because == "review_budget_exhausted"
    # The budget is shared: another replica in the same minute gets nothing more, the next minute does.
    other = _selector(settings, budget=2)
    assert not other.select([Candidate("late", 0.9, [], {})], now=1010.0)[0].selected
    assert other.select([Candidate("next", 0.9, [], {})], now=1070.0)[0].selected


def test_near_identical_burst_is_covered_by_one_review(settings: Settings) -> None:
    selector = _selector(settings, budget=100)
    first = selector.select([Candidate("a", 0.8, [], {})], now=0.0)
    assert first[0].selected
    burst = selector.select(
        [
            Candidate("a-copy", 0.8, [DuplicateMatch(upload_id="a", score=0.99)], {}),
            Candidate("b", 0.7, [], {}),
            Candidate("b-copy", 0.6, [DuplicateMatch(upload_id="b", score=0.98)], {}),
            Candidate("a-loose", 0.5, [DuplicateMatch(upload_id="a", score=0.90)], {}),
        ],
        now=0.0,
    )
    by_id = {c.upload_id: c for c in burst}
    assert by_id["a-copy"].skipped_because == "review_covered_by:a"
    assert by_id["b"].selected and by_id["b-copy"].skipped_because == "review_covered_by:b"
    assert by_id["a-loose"].selected  # similar, not near-identical: worth its own label
