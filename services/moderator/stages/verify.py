"""Local-feature verification of an upload's candidates; their fused scores replace the cosines.

Every upload of a group is verified at once in the worker processes (``verify_upload`` is pure); the second pass
(references found by keypoints) follows for those still unsure, and is verified the same way. Last, uploads whose
geometry agrees with a reference that their score undersold (``Verifier.undersold``: a photo pasted into a meme or
a collage) have their regions embedded, all in one call, and the best region's cosine replaces the whole's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import redis
from numpy.typing import NDArray

from services.common.config import DecisionSettings
from services.common.errors import TransientError
from services.common.index import Neighbour, RecentIndex
from services.common.regions import Infer, embed_regions, nearest_view
from services.common.schemas import MatchEvidence
from services.common.timing import elapsed_ms
from services.common.verification import FeatureStore, LocalFeatures, Verification, Verifier, rescored, verify_upload
from services.moderator.metrics import ModeratorMetrics
from services.moderator.stages.candidates import FirstPass, KeypointChannel, embedding_of
from services.moderator.stages.envelope import Item
from services.moderator.stages.workers import Workers


@dataclass
class Verified:
    """An upload's candidates after verification: rescored, with the evidence a verdict shows."""

    neighbours: list[Neighbour]
    matches: list[MatchEvidence] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    item: Item
    neighbours: list[Neighbour]
    best: float | None  # the descriptor's best, when nothing was chosen to verify
    chosen: list[Neighbour]
    reasons: list[str] = field(default_factory=list)
    first: list[Verification] = field(default_factory=list)
    second: list[Verification] = field(default_factory=list)
    second_candidates: list[Neighbour] = field(default_factory=list)
    by_regions: set[str] = field(default_factory=set)  # references a region of the upload came closer to

    def verified(self) -> list[Verification]:
        return self.first + self.second


class VerifyStage:
    def __init__(
        self,
        verifier: Verifier,
        feature_store: FeatureStore,
        channel: KeypointChannel,
        workers: Workers,
        metrics: ModeratorMetrics,
        infer: Infer | None = None,
    ) -> None:
        self.verifier = verifier
        self.feature_store = feature_store
        self.channel = channel
        self.workers = workers
        self.metrics = metrics
        self.infer = infer  # the served models, for uploads' regions (None: not looked at)

    def group(
        self,
        model_version: str,
        group: list[Item],
        passes: list[FirstPass],
        cfg: DecisionSettings,
        index: RecentIndex,
        batch_features: dict[str, LocalFeatures],
    ) -> list[Verified]:
        threshold = cfg.duplicate_threshold
        out = [Verified(p.neighbours) for p in passes]
        pending: dict[int, _Pending] = {}
        for n, (item, first) in enumerate(zip(group, passes, strict=True)):
            if item.image is None or item.image.features is None:
                continue
            chosen = self.verifier.candidates(first.neighbours, threshold, cfg.review_margin)
            best = first.neighbours[0].score if first.neighbours and not chosen else None
            if chosen or self.verifier.needs_second_pass(best, threshold):
                pending[n] = _Pending(item, first.neighbours, best, chosen)

        first_round = {n: p.chosen for n, p in pending.items() if p.chosen}
        for n, found in self._verify(first_round, pending, batch_features, "verify").items():
            pending[n].first = found

        for p in pending.values():
            best = max((v.score for v in p.first), default=p.best)
            if not self.verifier.needs_second_pass(best, threshold):
                continue
            assert p.item.image is not None and p.item.image.features is not None
            exclude = {c.upload_id for c in p.chosen} | {p.item.upload_id}
            try:
                p.second_candidates = self.channel.neighbours(
                    p.item.image.features, embedding_of(p.item), exclude, index
                )
            except TransientError:
                p.reasons.append("second_pass_unavailable")
        second_round = {n: p.second_candidates for n, p in pending.items() if p.second_candidates}
        for n, found in self._verify(second_round, pending, batch_features, "second_pass").items():
            pending[n].second = found
            pending[n].item.span.set_attribute("sieve.second_pass_candidates", len(second_round[n]))

        batch_vectors = {p.entry.upload_id: p.entry.vector for p in passes}
        self._by_query_regions(model_version, pending, threshold, index, batch_vectors)
        for n, p in pending.items():
            out[n] = _verified(p, threshold)
        return out

    def _by_query_regions(
        self,
        model_version: str,
        pending: dict[int, _Pending],
        threshold: float,
        index: RecentIndex,
        batch_vectors: dict[str, NDArray[np.float32]],
    ) -> None:
        """Uploads with no match yet and an undersold pair: their regions, embedded in one call, against the
        stored embeddings of those references."""
        unsure = [
            p
            for p in pending.values()
            if not any(v.score >= threshold for v in p.verified())
            and any(self.verifier.undersold(v.inliers, v.score, threshold) for v in p.verified())
        ]
        if not unsure or self.infer is None:
            return
        began = time.perf_counter()
        wanted = {v.upload_id for p in unsure for v in p.verified()} - set(batch_vectors)
        try:
            embedded = embed_regions(self.infer, [_pixels(p.item) for p in unsure], model_version)
            stored = {**index.vectors(sorted(wanted)), **batch_vectors} if embedded is not None else {}
        except (TransientError, redis.RedisError):
            for p in unsure:
                p.reasons.append("regions_unavailable")  # the whole upload's scores stand
            return
        if embedded is None:
            return  # another version answered: a promotion in between
        ms = elapsed_ms(began) / len(unsure)
        for p, regions in zip(unsure, embedded, strict=True):

            def closer(v: Verification, regions: NDArray[np.float32] = regions, p: _Pending = p) -> Verification:
                if v.upload_id not in stored or not self.verifier.undersold(v.inliers, v.score, threshold):
                    return v
                rescored = self.verifier.closer(v, nearest_view(regions, stored[v.upload_id]))
                if rescored is not v:
                    p.by_regions.add(v.upload_id)
                return rescored

            p.first, p.second = [closer(v) for v in p.first], [closer(v) for v in p.second]
            p.item.timings["query_regions_ms"] = ms
            p.item.span.set_attribute("sieve.query_regions", True)
        self.metrics.stage("query_regions", ms * len(unsure) / 1000.0)

    def _verify(
        self,
        candidates: dict[int, list[Neighbour]],
        pending: dict[int, _Pending],
        batch_features: dict[str, LocalFeatures],
        stage: str,
    ) -> dict[int, list[Verification]]:
        if not candidates:
            return {}
        order = list(candidates)
        calls = []
        for n in order:
            item = pending[n].item
            assert item.image is not None and item.image.features is not None
            references = self._references(candidates[n], batch_features, pending[n].reasons)
            calls.append((self.verifier.settings, item.image.features, item.image.detail, candidates[n], references))
        results = self.workers.map(verify_upload, calls)
        found = {}
        for n, (verifications, ms) in zip(order, results, strict=True):
            pending[n].item.timings[f"{stage}_ms"] = ms
            self.metrics.stage(stage, ms / 1000.0)
            found[n] = verifications
        return found

    def _references(
        self, candidates: list[Neighbour], batch_features: dict[str, LocalFeatures], reasons: list[str]
    ) -> dict[str, LocalFeatures]:
        """This batch's own features first, then the shared store's."""
        wanted = [n.upload_id for n in candidates]
        references = {u: batch_features[u] for u in wanted if u in batch_features}
        missing = [u for u in wanted if u not in references]
        try:
            references.update(self.feature_store.get_many(missing))
        except redis.RedisError:
            if "verification_unavailable" not in reasons:
                reasons.append("verification_unavailable")  # the descriptor's scores stand
        return references


def _verified(p: _Pending, threshold: float) -> Verified:
    neighbours = p.neighbours
    if p.second:
        known = {v.upload_id for v in p.second}
        neighbours = [n for n in neighbours if n.upload_id not in known]
        neighbours += [Neighbour(v.upload_id, v.cosine) for v in p.second]
    reasons = list(p.reasons)
    for kind, group in (("verified_match", p.first), ("keypoint_match", p.second)):
        reasons += [f"{kind}:{v.upload_id}:{v.inliers}" for v in group if v.score >= threshold > v.cosine]
    reasons += [f"query_regions:{u}" for u in sorted(p.by_regions)]  # their evidence's cosine is a region's
    verified = p.verified()
    matches = [
        MatchEvidence(
            upload_id=v.upload_id, cosine=round(v.cosine, 6), inliers=v.inliers, mirrored=v.mirrored, score=v.score
        )
        for v in verified
    ]
    p.item.span.set_attribute("sieve.verified", len(verified))
    return Verified(rescored(neighbours, verified), matches, reasons)


def _pixels(item: Item) -> NDArray[np.uint8]:
    assert item.image is not None
    return item.image.pixels
