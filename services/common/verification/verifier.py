"""Which candidates to verify, and their fused scores: one rule for the moderator, the benchmark and explain."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.common.config import VerificationSettings
from services.common.index.base import Neighbour
from services.common.timing import elapsed_ms
from services.common.verification.features import FeatureExtractor, LocalFeatures
from services.common.verification.keypoint_index import KeypointHit, KeypointIndex
from services.common.verification.matching import Verification, count_inliers, fuse


@dataclass
class QueryFeatures:
    """An upload's features, and a way to get its mirrored features only if a candidate needs them."""

    features: LocalFeatures
    mirrored: Callable[[], LocalFeatures] | None = None
    _mirrored: LocalFeatures | None = None

    def mirror(self) -> LocalFeatures | None:
        if self._mirrored is None and self.mirrored is not None:
            self._mirrored = self.mirrored()
        return self._mirrored


class Verifier:
    def __init__(self, settings: VerificationSettings) -> None:
        self.settings = settings
        self.extractor = FeatureExtractor(settings.kind, settings.max_features, settings.min_side)

    def candidates(self, neighbours: Sequence[Neighbour], threshold: float, band: float = 0.0) -> list[Neighbour]:
        """The nearest ``top_k`` that a full inlier bonus could lift to within ``band`` of the threshold (the
        review band), unless the best is already far above the threshold (then none): verifying a pair whose
        fused score cannot change the decision only costs time."""
        if not self.settings.enabled or not neighbours:
            return []
        if neighbours[0].score >= threshold + self.settings.sure_margin:
            return []
        reach = self.reach(threshold - band)
        return [n for n in neighbours[: self.settings.top_k] if n.score >= reach]

    def reach(self, threshold: float) -> float:
        """The lowest cosine that a full inlier bonus can lift to ``threshold``: nothing below is worth verifying.
        With the cosine floor, geometry alone may carry any cosine that far."""
        cfg = self.settings
        if not cfg.enabled:
            return threshold
        if cfg.cosine_floor is not None and cfg.cosine_floor + cfg.weight >= threshold:
            return -1.0
        return threshold - cfg.weight

    def needs_second_pass(self, best: float | None, threshold: float) -> bool:
        """No candidate, or none surely above the threshold: look further than the descriptor's nearest."""
        cfg = self.settings
        return cfg.enabled and cfg.second_pass and (best is None or best < threshold + cfg.second_pass_margin)

    def keypoint_index(self) -> KeypointIndex:
        """An empty index with the configured channel settings."""
        cfg = self.settings
        return KeypointIndex(
            cfg.keypoint_per_image, cfg.keypoint_max_distance, cfg.keypoint_neighbours, cfg.keypoint_probes
        )

    def keypoint_candidates(
        self, index: KeypointIndex, query: LocalFeatures, exclude: Iterable[str]
    ) -> list[KeypointHit]:
        cfg = self.settings
        return index.search(query, cfg.keypoint_top, cfg.keypoint_min_votes, exclude)

    def keypoint_neighbours(
        self,
        index: KeypointIndex,
        query: LocalFeatures,
        embedding: NDArray[np.float32],
        exclude: Iterable[str],
        vectors: Callable[[list[str]], Mapping[str, NDArray[Any]]],
    ) -> list[Neighbour]:
        """The second pass's candidates: references that share the query's keypoints, each with its cosine to
        ``embedding`` from ``vectors`` (the recent index's stored embeddings). Raises what ``vectors`` raises."""
        hits = self.keypoint_candidates(index, query, exclude)
        if not hits:
            return []
        stored = vectors([h.upload_id for h in hits])
        return [
            Neighbour(h.upload_id, float(np.dot(stored[h.upload_id], embedding))) for h in hits if h.upload_id in stored
        ]

    def score(self, cosine: float, inliers: int, query_keypoints: int = 0, reference_keypoints: int = 0) -> float:
        """The fused score of one verified pair; a miss counts against it only when both sides had keypoints
        enough for the check to mean something (with inliers above the floor there is no miss)."""
        cfg = self.settings
        informative = min(query_keypoints, reference_keypoints) >= cfg.miss_min_keypoints
        penalty = cfg.miss_penalty if informative else 0.0
        return fuse(cosine, inliers, cfg.weight, cfg.inlier_floor, cfg.inlier_cap, penalty, cfg.cosine_floor)

    def undersold(self, inliers: int | None, score: float, threshold: float) -> bool:
        """Geometry agrees with a reference (inliers above the floor) and the fused score still falls short: the
        upload may hold the reference inside a larger picture (a meme, a collage, a screenshot), where the whole
        upload's embedding is far from it, so its regions are worth embedding (``query_regions``)."""
        cfg = self.settings
        agrees = inliers is not None and inliers > cfg.inlier_floor
        return cfg.enabled and cfg.query_regions and agrees and score < threshold

    def closer(self, verified: Verification, cosine: float) -> Verification:
        """A verified pair rescored with a better cosine (a region of the upload against the reference); its
        geometry stands, so the pair is not matched again."""
        if cosine <= verified.cosine:
            return verified
        score = round(self.score(cosine, verified.inliers), 6)
        return Verification(verified.upload_id, cosine, verified.inliers, verified.mirrored, score)

    def verify(
        self, query: QueryFeatures, neighbours: Sequence[Neighbour], references: Mapping[str, LocalFeatures]
    ) -> list[Verification]:
        """One result per neighbour whose features are known, in the neighbours' order."""
        cfg = self.settings
        out = []
        for rank, neighbour in enumerate(neighbours):
            reference = references.get(neighbour.upload_id)
            if reference is None or reference.kind != query.features.kind:
                continue
            inliers = count_inliers(query.features, reference, cfg.ratio, cfg.ransac_px)
            mirrored = False
            if inliers <= cfg.inlier_floor and rank < cfg.mirror_top_k:
                flipped = query.mirror()
                if flipped is not None:
                    flipped_inliers = count_inliers(flipped, reference, cfg.ratio, cfg.ransac_px)
                    if flipped_inliers > inliers:
                        inliers, mirrored = flipped_inliers, True
            score = self.score(neighbour.score, inliers, len(query.features), len(reference))
            out.append(Verification(neighbour.upload_id, neighbour.score, inliers, mirrored, round(score, 6)))
        return out


def rescored(neighbours: Sequence[Neighbour], verified: Sequence[Verification]) -> list[Neighbour]:
    """The neighbours with verified ones carrying their fused score, best first."""
    fused = {v.upload_id: v.score for v in verified}
    out = [Neighbour(n.upload_id, fused.get(n.upload_id, n.score)) for n in neighbours]
    return sorted(out, key=lambda n: -n.score)


_verifiers: dict[str, Verifier] = {}


def verify_upload(
    settings: VerificationSettings,
    features: LocalFeatures,
    detail: NDArray[np.uint8] | None,
    neighbours: Sequence[Neighbour],
    references: Mapping[str, LocalFeatures],
) -> tuple[list[Verification], float]:
    """One upload's candidates verified, and the milliseconds it took: plain data in and out, so it runs in a
    worker process. Mirrored keypoints are extracted from ``detail`` only if a candidate needs them."""
    began = time.perf_counter()
    key = settings.model_dump_json()
    verifier = _verifiers.get(key)
    if verifier is None:
        verifier = _verifiers[key] = Verifier(settings)
    extract = verifier.extractor.extract_mirrored
    query = QueryFeatures(features, (lambda: extract(detail)) if detail is not None else None)
    return verifier.verify(query, neighbours, references), elapsed_ms(began)
