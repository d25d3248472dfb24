"""When a banked image's nearest embedding is a match: the recent index's keypoint check has the last word.

Cosine alone over-matches images of one kind (two nebulae, two hammers, two photos of one monument): an
embedding trained for copies still puts look-alikes close. A bank match acts without a reviewer, so it must be
a copy. Each candidate within reach of its threshold is verified with the keypoints banked with the image, and
the score compared with the bank's threshold is ``Verifier.score``'s fused score (cosine, plus the inlier bonus,
minus the miss penalty when both images are keypoint-rich and no geometry agrees): the same score, and the same
meaning of a threshold, as the version's duplicate threshold for the recent index. Where either side has no
keypoints (verification off, an image banked before keypoints were kept) the fused score is the cosine.

A banked image's cosine is the best of its whole and its regions' (``EmbeddingBanks``). Seven views give a
look-alike seven chances, so a region's cosine counts only with geometric support (inliers above the floor);
without it the score is the whole image's. On the bank benchmark one nebula, near a region of another and
with no keypoints in common, was blocked until this rule.

One rule for the moderator and the match API (an image against banked images, ``NearBankMatcher``) and for
retroactive actioning (a banked image against recent uploads).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from numpy.typing import NDArray

from services.common.banks.embeddings import SEP, EmbeddingBanks, EmbeddingHit
from services.common.banks.store import BankMatch, HashBankStore
from services.common.errors import TransientError
from services.common.index.base import Neighbour
from services.common.regions import Infer, embed_regions, nearest_view
from services.common.telemetry import meter
from services.common.thresholds import ThresholdResolver
from services.common.verification import KeypointHit, KeypointIndex, LocalFeatures, QueryFeatures, Verifier

log = logging.getLogger(__name__)
_regions_embedded = meter("sieve.banks").create_counter(
    "sieve_bank_query_regions", description="uploads whose regions were embedded to judge a banked image again"
)


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
        whole: Mapping[str, float] | None = None,
    ) -> list[Judged]:
        """``candidates`` most similar first, each with its threshold in ``thresholds`` (by key); ``whole``, the
        whole image's cosine of those whose score is a region's."""
        verified = {}
        if query is not None and self.verifier.settings.enabled:
            verified = {v.upload_id: v for v in self.verifier.verify(query, candidates, references)}
        floor = self.verifier.settings.inlier_floor
        out = []
        for c in candidates:
            v = verified.get(c.upload_id)
            score = v.score if v is not None else c.score
            inliers = v.inliers if v is not None else None
            own = (whole or {}).get(c.upload_id)
            if own is not None and (inliers is None or inliers <= floor):
                score -= c.score - own  # no inlier bonus: the fused score is linear in the cosine (matching.fuse)
            out.append(Judged(c.upload_id, c.score, score, inliers, score >= thresholds[c.upload_id]))
        return out


class NearBankMatcher:
    """An image against every enabled bank's banked images: the nearest embedding per bank, then (where none is
    surely a copy) the second pass's keypoint channel, all judged by the rule above; last, where geometry agrees
    with a banked image the score undersold, the upload's own regions (``infer``: the served models; None: not
    looked at). One owner for the moderator and the match API."""

    def __init__(
        self, store: HashBankStore, embeddings: EmbeddingBanks, rule: BankEmbeddingRule, infer: Infer | None = None
    ) -> None:
        self.store = store
        self.embeddings = embeddings
        self.rule = rule
        self.infer = infer
        self.regions_embedded = 0  # uploads that paid for their regions' embeddings (also a metric)

    def match(
        self,
        model_version: str,
        embedding: NDArray[np.float32],
        query: QueryFeatures | None,
        pixels: NDArray[np.uint8] | None = None,
    ) -> list[BankMatch]:
        """``pixels``: the upload's model input, for its regions. Raises redis.RedisError when the banks cannot
        be read."""
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
        whole = {f"{h.bank}{SEP}{h.item_id}": h.whole for h in hits if h.whole is not None}
        if not near:
            return []
        keys = [cast(tuple[str, str], tuple(n.upload_id.split(SEP, 1))) for n in near]
        banked = self.embeddings.features(keys) if query is not None else {}
        references = {f"{bank}{SEP}{item_id}": f for (bank, item_id), f in banked.items()}
        judged = self.rule.judge(query, near, thresholds, references, whole)
        if pixels is not None:
            judged = self._by_query_regions(model_version, judged, pixels, thresholds)
        return [
            BankMatch(
                bank, "embedding", round(1.0 - j.cosine, 4), item_id, "", round(j.score, 4), j.inliers, own[bank].action
            )
            for j in judged
            if j.matched
            for bank, item_id in [j.key.split(SEP, 1)]
        ]

    def _by_query_regions(
        self, model_version: str, judged: list[Judged], pixels: NDArray[np.uint8], thresholds: Mapping[str, float]
    ) -> list[Judged]:
        """A photo pasted into a meme, a collage or a screenshot shares its keypoints with the banked image while
        the whole upload's embedding is far from it. Where the verifier calls a pair undersold, the upload's
        regions are embedded (only such uploads pay for it) and the nearest pair of views, region or whole on
        either side, replaces the cosine; the inliers stand."""
        verifier = self.rule.verifier
        unsure = {j.key: j for j in judged if verifier.undersold(j.inliers, j.score, thresholds[j.key])}
        if not unsure or self.infer is None:
            return judged
        self.regions_embedded += 1
        _regions_embedded.add(1)
        try:
            embedded = embed_regions(self.infer, [pixels], model_version)
        except TransientError as exc:
            log.warning("regions of an upload not embedded, its first judgement stands: %s", exc)
            return judged
        if embedded is None:
            return judged
        again = {}
        for key, views in self.embeddings.views(model_version, list(unsure)).items():
            first = unsure[key]
            assert first.inliers is not None
            cosine = nearest_view(embedded[0], views)
            if cosine > first.cosine:
                score = verifier.score(cosine, first.inliers)
                again[key] = Judged(key, cosine, score, first.inliers, score >= thresholds[key])
        return [again.get(j.key, j) for j in judged]

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
