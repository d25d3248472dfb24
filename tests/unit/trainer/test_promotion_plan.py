"""Which admin promotion requests may run, and the reason an admin reads when one may not."""

from __future__ import annotations

import pytest

from services.common.promotions import PromotionRecord, entry_time
from services.trainer.promotion_plan import Plan, Refusal, RepositoryView, plan


def _view(installed: tuple[int, ...] = (1, 2), staged: tuple[int, ...] = (), serving: int | None = 2) -> RepositoryView:
    return RepositoryView("sieve_embedder", True, installed, staged, serving)


def test_a_staged_candidate_newer_than_everything_installed_is_promoted_from_the_serving_version() -> None:
    assert plan("3", _view(staged=(3,))) == Plan(3, "staged", 2)


def test_an_installed_version_triton_has_not_loaded_yet_is_promoted_in_place() -> None:
    assert plan("3", _view(installed=(1, 2, 3))) == Plan(3, "installed", 2)


@pytest.mark.parametrize(
    ("version", "view", "why"),
    [
        ("3", RepositoryView("nope", False, (), (), None), "unknown model 'nope'"),
        ("x3", _view(), "not a version number"),
        ("3", _view(staged=(3,), serving=None), "not loaded in Triton"),
        ("2", _view(), "version 2 of sieve_embedder is already serving"),
        ("1", _view(), "older than the serving version 2: use `sieve trainer rollback`"),
        ("3", _view(installed=(1, 2, 3, 4)), "but 4 is newer and Triton would serve that"),
        ("2", _view(installed=(1, 2, 3), staged=(2,), serving=3), "older than the serving version 3"),
        ("3", _view(installed=(1, 2, 4), staged=(3,)), "would not be the newest installed one (4 is)"),
        ("9", _view(staged=(3,)), "version 9 of sieve_embedder is neither installed nor staged"),
    ],
)
def test_refusals_say_why(version: str, view: RepositoryView, why: str) -> None:
    decided = plan(version, view)
    assert isinstance(decided, Refusal)
    assert why in decided.reason


def test_a_record_keeps_the_request_time_of_its_stream_entry() -> None:
    assert entry_time("1700000000123-4") == 1700000000.123
    record = PromotionRecord(request_id="1-0", model="m", version="2", requested_at=1.0, updated_at=1.0)
    assert PromotionRecord.model_validate_json(record.model_dump_json()) == record
    assert record.state.value == "requested"
