"""When a banked image's nearest embedding is a match: the recent index's keypoint check has the last word.

Cosine alone over-matches images of one kind (two nebulae, two hammers, two photos of one monument): an
embedding trained for copies still puts look-alikes close. A bank match acts without a reviewer, so it must be
a copy. Each candidate within reach of its threshold is verified with the keypoints banked with the image, and
the score compared with the bank's threshold is ``Verifier.score``'s fused score (cosine, plus the inlier bonus,
minus the miss penalty when both images are keypoint-rich and no geometry agrees): the same score, and the same
meaning of a threshold, as the version's duplicate threshold for the recent index. Where either side has no
keypoints (verification off, an image banked before keypoints were kept) the fused score is the cosine.

One rule for the moderator and the match API (an image against banked images, ``NearBankMatcher``) and for
retroactive actioning (a banked image against recent uploads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from numpy.typing import NDArray

from services.common.banks.embeddings import SEP, EmbeddingBanks, EmbeddingHit
from services.common.banks.store import BankMatch, HashBankStore
from services.common.index.base import Neighbour
from services.common.thresholds import ThresholdResolver
from services.common.verification import KeypointHit, KeypointIndex, LocalFeatures, QueryFeatures, Verifier


@dataclass(frozen=True)
class Judged:
    """One candidate's verdict under the rule; ``inliers`` is None when it could not be verified."""

    key: str  # the candidate's id: ``<bank>/<item id>`` in the moderator, an upload id in re-judging
    cosine: float
    score: float  # fused; the cosine when unverified
    inliers: int | None
    matched: bool


class BankEmbeddingRule:
    def __init__(self, thresholds: ThresholdResolver, verifier: Verifier) -> None:
        self.thresholds = thresholds
        self.verifier = verifier

    def threshold(self, model_version: str, own: float | None) -> float:
        """The bank's own threshold, else the version's (services.common.thresholds resolves it)."""
        return self.thresholds.bank(model_version, own).value

    def reach(self, threshold: float) -> float:
        return self.verifier.reach(threshold)

    def judge(
        self,
        query: QueryFeatures | None,
        candidates: Sequence[Neighbour],
        thresholds: Mapping[str, float],
        references: Mapping[str, LocalFeatures],
    ) -> list[Judged]:
        """``candidates`` most similar first, each with its threshold in ``thresholds`` (by key)."""
        verified = {}
        if query is not None and self.verifier.settings.enabled:
            verified = {v.upload_id: v for v in self.verifier.verify(query, candidates, references)}
        out = []
        for c in candidates:
            v = verified.get(c.upload_id)
            score = v.score if v is not None else c.score
            inliers = v.inliers if v is not None else None
            out.append(Judged(c.upload_id, c.score, score, inliers, score >= thresholds[c.upload_id]))
        return out


class NearBankMatcher:
    """An image against every enabled bank's banked images: the nearest embedding per bank, then (where none is
    surely a copy) the second pass's keypoint channel, all judged by the rule above. One owner for the moderator
    and the match API."""

    def __init__(self, store: HashBankStore, embeddings: EmbeddingBanks, rule: BankEmbeddingRule) -> None:
        self.store = store
        self.embeddings = embeddings
        self.rule = rule

    def match(self, model_version: str, embedding: NDArray[np.float32], query: QueryFeatures | None) -> list[BankMatch]:
        """Raises redis.RedisError when the banks cannot be read."""
        hits = self.embeddings.search(model_version, embedding)
        if query is not None:
            hits += self._keypoint_hits(model_version, embedding, query.features, hits)
        own = self.store.enabled_policies(sorted({h.bank for h in hits}))
        thresholds = {
            f"{h.bank}{SEP}{h.item_id}": self.rule.threshold(model_version, own[h.bank].embedding_threshold)
            for h in hits
            if h.bank in own
        }
        near = [
            Neighbour(key, h.cosine)
            for h in hits
            if (key := f"{h.bank}{SEP}{h.item_id}") in thresholds and h.cosine >= self.rule.reach(thresholds[key])
        ]
        if not near:
            return []
        keys = [cast(tuple[str, str], tuple(n.upload_id.split(SEP, 1))) for n in near]
        banked = self.embeddings.features(keys) if query is not None else {}
        references = {f"{bank}{SEP}{item_id}": f for (bank, item_id), f in banked.items()}
        return [
            BankMatch(
                bank, "embedding", round(1.0 - j.cosine, 4), item_id, "", round(j.score, 4), j.inliers, own[bank].action
            )
            for j in self.rule.judge(query, near, thresholds, references)
            if j.matched
            for bank, item_id in [j.key.split(SEP, 1)]
        ]

    def _keypoint_hits(
        self, model_version: str, embedding: NDArray[np.float32], features: LocalFeatures, hits: list[EmbeddingHit]
    ) -> list[EmbeddingHit]:
        verifier = self.rule.verifier
        threshold = self.rule.threshold(model_version, None)
        if not verifier.needs_second_pass(max((h.cosine for h in hits), default=None), threshold):
            return []
        seen = {f"{h.bank}{SEP}{h.item_id}" for h in hits}

        def pick(index: KeypointIndex, query: LocalFeatures) -> list[KeypointHit]:
            return verifier.keypoint_candidates(index, query, seen)

        return self.embeddings.search_keypoints(model_version, embedding, features, pick)
