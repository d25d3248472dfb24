"""Hash-bank management against the real Redis."""

from __future__ import annotations

import pytest
import redis

from services.common.banks import HashBankStore
from services.common.config import Settings


@pytest.fixture()
def banks(settings: Settings) -> HashBankStore:
    return HashBankStore(redis.Redis.from_url(settings.redis.url.get_secret_value()), settings.redis.key_prefix)


def test_match_names_every_enabled_bank(banks: HashBankStore) -> None:
    banks.create("a")
    banks.create("b")
    banks.add_hashes("a", [("sha256", "1" * 64)])
    banks.add_hashes("b", [("sha256", "1" * 64), ("phash", "f0f0f0f0f0f0f0f0")])
    assert banks.match("1" * 64, None) == ["a", "b"]
    assert banks.match("2" * 64, "f0f0f0f0f0f0f0f0") == ["b"]
    assert banks.match("2" * 64, None) == []
    banks.set_enabled("a", False)
    assert banks.match("1" * 64, None) == ["b"]
    assert [(b.name, b.enabled, b.size) for b in banks.all_banks()] == [("a", False, 1), ("b", True, 2)]


def test_remove_drops_the_bank_and_its_hashes(banks: HashBankStore) -> None:
    banks.create("gone")
    banks.add_hashes("gone", [("sha256", "3" * 64)])
    banks.remove("gone")
    assert banks.match("3" * 64, None) == []
    with pytest.raises(KeyError):
        banks.get("gone")
    with pytest.raises(KeyError):
        banks.add_hashes("gone", [("sha256", "4" * 64)])
