"""The decision, in arrival order: the model's verdict, the banks' action over it, and who goes to review."""

from __future__ import annotations

import time
from typing import cast

import redis

from services.common.banks import BankMatch
from services.common.banks.near import NearBankMatcher
from services.common.config import DecisionSettings
from services.common.schemas import Action, ReviewReason, ReviewRequest
from services.common.telemetry import tracer
from services.common.timing import elapsed_ms
from services.common.upload_keys import upload_action_key
from services.common.verdicts import build_verdict, over_model
from services.common.verification import QueryFeatures, Verifier
from services.moderator.active_learning import Candidate, ReviewSelector
from services.moderator.decide import Decision, decide
from services.moderator.stages.candidates import FirstPass, embedding_of
from services.moderator.stages.envelope import BatchOutput, Item
from services.moderator.stages.verify import Verified

_tracer = tracer("sieve.moderator")


class Assembler:
    def __init__(
        self,
        redis_client: redis.Redis,
        key_prefix: str,
        selector: ReviewSelector,
        near_banks: NearBankMatcher,
        verifier: Verifier,
    ) -> None:
        self.redis = redis_client
        self.prefix = key_prefix
        self.selector = selector
        self.near_banks = near_banks
        self.verifier = verifier
        self._priorities: dict[str, float] = {}

    def group(
        self,
        model_version: str,
        group: list[Item],
        passes: list[FirstPass],
        verified: list[Verified],
        cfg: DecisionSettings,
        out: BatchOutput,
    ) -> None:
        decided: list[tuple[Item, Decision, list[str]]] = []
        batch_actions: dict[str, str] = {}
        banked: dict[str, list[BankMatch]] = {}
        for item, first, checked in zip(group, passes, verified, strict=True):
            assert item.inferred is not None and item.image is not None
            result, row = item.inferred.result, item.inferred.row
            scores = {c: float(result.scores[row, k]) for k, c in enumerate(result.categories)}
            twins = [n.upload_id for n in checked.neighbours if n.score >= cfg.duplicate_threshold]
            decision = decide(checked.neighbours, scores, cfg, self._actions_of(twins, batch_actions))
            batch_actions[item.upload_id] = decision.action.value
            out.index_entries.append(first.entry)
            if item.image.features is not None:
                out.features[item.upload_id] = item.image.features  # later uploads verify against them
            extra = ["bank_check_unavailable"] if item.bank_check_failed else []
            decided.append((item, decision, extra + checked.reasons))
            banked[item.upload_id] = item.bank_review + self._embedding_bank_matches(item, model_version)

        selected = self._select_reviews(decided)
        for (item, decision, extra), checked in zip(decided, verified, strict=True):
            assert item.event is not None and item.image is not None
            reasons = decision.reasons + extra
            skip = selected.get(item.upload_id)
            banks = banked[item.upload_id]
            # A near copy of a banked image: the bank's action (a blocked one needs no reviewer).
            outcome = over_model(decision.action, banks)
            action, reasons, watched = outcome.action, outcome.reasons + reasons, outcome.watched
            if decision.review_reason is not None and skip and not banks:
                reasons.append(skip)
                if action is Action.REVIEW:
                    action = Action.ALLOW  # REVIEW always means a reviewer will see it; this one will not
            verdict = build_verdict(
                item.upload_id,
                item.event.event_id,
                model_version,
                action,
                reasons,
                duplicate_of=decision.duplicate_of,
                flags=decision.flags,
                timings=item.timings,
                evidence=checked.matches,
                bank_matches=outcome.evidence,
            )
            out.hashes[verdict.upload_id] = (item.image.sha256, item.image.phash)
            if item.image.pdq:
                out.pdqs[verdict.upload_id] = item.image.pdq
            out.uris[verdict.upload_id] = item.event.image_uri
            item.span.set_attribute("sieve.action", action.value)
            out.verdicts.append((verdict, item.span))
            out.fresh_verdicts.append(verdict)
            if watched or (decision.review_reason is not None and not skip and not banks):
                request = ReviewRequest(
                    upload_id=item.upload_id,
                    image_uri=item.event.image_uri,
                    reason=ReviewReason.BANK_MATCH if watched else cast(ReviewReason, decision.review_reason),
                    priority=1.0 if watched else self._priorities.get(item.upload_id, decision.review_priority),
                    scores=decision.flags,
                    neighbours=decision.neighbours,
                    model_version=model_version,
                    bank_matches=outcome.evidence,
                    evidence=checked.matches,
                )
                out.reviews.append((request, item.span))

    def _embedding_bank_matches(self, item: Item, model_version: str) -> list[BankMatch]:
        """Enabled banks holding an image this upload is a verified near copy of (``banks.near``'s rule)."""
        assert item.image is not None
        query = None
        image = item.image
        if image.features is not None and image.detail is not None:
            detail, extractor = image.detail, self.verifier.extractor
            query = QueryFeatures(image.features, lambda: extractor.extract_mirrored(detail))
        began = time.perf_counter()
        try:
            found = self.near_banks.match(model_version, embedding_of(item), query, image.pixels)
        except redis.RedisError:
            return []  # the hash banks were checked already; a banked embedding is a second chance
        item.timings["bank_verify_ms"] = elapsed_ms(began)
        return found

    def _select_reviews(self, decided: list[tuple[Item, Decision, list[str]]]) -> dict[str, str]:
        """upload_id -> why it is not sent to review ("" when it is)."""
        candidates = [
            Candidate(item.upload_id, decision.review_priority, decision.neighbours, item.event.metadata)
            for item, decision, _ in decided
            if decision.review_reason is not None and item.event is not None
        ]
        if not candidates:
            return {}
        chosen = self.selector.select(candidates)
        self._priorities = {c.upload_id: c.priority for c in chosen}
        return {c.upload_id: c.skipped_because for c in chosen}

    def _actions_of(self, upload_ids: list[str], batch_actions: dict[str, str]) -> dict[str, str]:
        """Earlier verdicts of the near-duplicates found, for the disagreement check."""
        found = {u: batch_actions[u] for u in upload_ids if u in batch_actions}
        rest = [u for u in upload_ids if u not in found]
        if rest:
            try:
                keys = [upload_action_key(self.prefix, u) for u in rest]
                values = cast(list[bytes | None], self.redis.mget(keys))
                found.update({u: v.decode() for u, v in zip(rest, values, strict=True) if v})
            except redis.RedisError:
                pass
        return found
