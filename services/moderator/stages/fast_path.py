"""Answers without the model: a hash in a blocking bank, or an exact re-upload of something already decided."""

from __future__ import annotations

import time

import redis

from services.common.banks import BankMatch, HashBankStore
from services.common.exact_store import ExactMatchStore, KnownUpload
from services.common.hashing import informative_phash
from services.common.schemas import Action, BankMatchEvidence, DuplicateMatch, Verdict
from services.common.timing import elapsed_ms
from services.common.verdicts import build_verdict, over_model
from services.moderator.stages.envelope import BatchOutput, Item


class FastPaths:
    def __init__(self, banks: HashBankStore, exact: ExactMatchStore) -> None:
        self.banks = banks
        self.exact = exact

    def answer(self, ready: list[Item], out: BatchOutput) -> list[Item]:
        """Verdicts for what needs no model go to ``out``; the rest, in order, is returned."""
        remaining: list[Item] = []
        first_in_batch: dict[str, Item] = {}
        for item in ready:
            assert item.event is not None and item.image is not None
            began = time.perf_counter()
            try:
                banks = self.banks.match(item.image.signals())
            except redis.RedisError:
                banks, item.bank_check_failed = [], True
            if any(m.action == "block" for m in banks):
                item.timings["hash_ms"] = elapsed_ms(began)
                outcome = over_model(Action.BLOCK, banks)
                verdict = _fast_verdict(item, outcome.action, [], {}, "", outcome.reasons, outcome.evidence)
                out.verdicts.append((verdict, item.span))
                continue
            if banks:  # only review banks: the model still judges it, and a reviewer sees it whatever it says
                item.timings["hash_ms"] = elapsed_ms(began)
                item.bank_review = banks
                remaining.append(item)
                continue
            known = self._exact_lookup(item)
            item.timings["hash_ms"] = elapsed_ms(began)
            if known is None and item.image.sha256 in first_in_batch:
                remaining.append(item)  # decided after its twin, by the model's near-duplicate search
                continue
            if known is not None:
                upload, kind = known
                match = [DuplicateMatch(upload_id=upload.upload_id, score=1.0)]
                reasons = [f"exact_hash_match:{kind}:{upload.upload_id}"]
                verdict = _fast_verdict(item, Action(upload.action), match, upload.flags, upload.model_version, reasons)
                out.verdicts.append((verdict, item.span))
                continue
            first_in_batch[item.image.sha256] = item
            remaining.append(item)
        return remaining

    def likely(self, item: Item) -> bool:
        """A read-only look at the banks and exact-match store, as of the batches committed so far: an item a
        fast path will answer is not worth inferring ahead."""
        assert item.image is not None
        try:
            banks: list[BankMatch] = self.banks.match(item.image.signals())
            if banks:
                return any(m.action == "block" for m in banks)  # review banks still need the model
            return self._exact_lookup(item) is not None
        except redis.RedisError:
            return False

    def _exact_lookup(self, item: Item) -> tuple[KnownUpload, str] | None:
        assert item.event is not None and item.image is not None
        phash = item.image.phash
        try:
            found = self.exact.lookup(item.image.sha256, phash if informative_phash(phash) else None)
        except redis.RedisError:
            return None  # the model path still finds it as a near-duplicate
        if found is None or found[0].upload_id == item.event.upload_id:
            return None
        return found


def _fast_verdict(
    item: Item,
    action: Action,
    matches: list[DuplicateMatch],
    flags: dict[str, float],
    model_version: str,
    reasons: list[str],
    bank_matches: list[BankMatchEvidence] | None = None,
) -> Verdict:
    assert item.event is not None
    item.span.set_attribute("sieve.action", action.value)
    item.span.set_attribute("sieve.fast_path", reasons[0].split(":", 1)[0])
    return build_verdict(
        item.event.upload_id,
        item.event.event_id,
        model_version,
        action,
        reasons,
        duplicate_of=matches,
        flags=flags,
        timings=item.timings,
        bank_matches=bank_matches or [],
    )
