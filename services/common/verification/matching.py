"""Geometric check of one candidate pair, and the fused score that the decision thresholds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from services.common.verification.features import LocalFeatures

MIN_MATCHES = 8  # fewer ratio-test matches than this cannot support a homography worth trusting


@dataclass(frozen=True)
class Verification:
    """What the check found for one (query, candidate) pair; it travels in the verdict's evidence."""

    upload_id: str
    cosine: float
    inliers: int
    mirrored: bool
    score: float  # the fused score the decision compares with the threshold


@dataclass(frozen=True)
class GeometricMatch:
    """The inlier correspondences themselves, for drawing (``sieve explain``)."""

    query_points: NDArray[np.float32]  # (n, 2)
    reference_points: NDArray[np.float32]  # (n, 2)

    @property
    def inliers(self) -> int:
        return int(self.query_points.shape[0])


_NO_MATCH = GeometricMatch(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32))


def count_inliers(query: LocalFeatures, reference: LocalFeatures, ratio: float = 0.75, ransac_px: float = 5.0) -> int:
    """Ratio-test matches that agree on one homography (RANSAC): 0 when there is no consistent geometry."""
    return match_geometry(query, reference, ratio, ransac_px).inliers


def match_geometry(
    query: LocalFeatures, reference: LocalFeatures, ratio: float = 0.75, ransac_px: float = 5.0
) -> GeometricMatch:
    if query.kind != reference.kind:
        raise ValueError(f"cannot match {query.kind} features against {reference.kind}")
    if len(query) < 2 or len(reference) < 2:
        return _NO_MATCH
    norm = cv2.NORM_HAMMING if query.kind == "orb" else cv2.NORM_L2
    q_desc, r_desc = query.descriptors, reference.descriptors
    if query.kind == "sift":
        q_desc, r_desc = q_desc.astype(np.float32), r_desc.astype(np.float32)
    pairs = cv2.BFMatcher(norm).knnMatch(q_desc, r_desc, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    if len(good) < MIN_MATCHES:
        return _NO_MATCH
    src = query.points[[m.queryIdx for m in good]].reshape(-1, 1, 2)
    dst = reference.points[[m.trainIdx for m in good]].reshape(-1, 1, 2)
    cv2.setRNGSeed(0)  # the same pair gives the same count on every replica and every redelivery
    homography, mask = cv2.findHomography(src, dst, cv2.RANSAC, ransac_px, maxIters=1000, confidence=0.995)
    if homography is None or mask is None or not _plausible(homography):
        return _NO_MATCH
    keep = mask.ravel().astype(bool)
    return GeometricMatch(src.reshape(-1, 2)[keep], dst.reshape(-1, 2)[keep])


def _plausible(homography: NDArray[Any]) -> bool:
    """Rejects warps no edit produces (a reflection, a collapse to a line, a 50x zoom): those are chance fits."""
    det = float(np.linalg.det(homography[:2, :2]))
    return 1.0 / 50.0 < abs(det) < 50.0 and det > 0


def fuse(cosine: float, inliers: int, weight: float, floor: int, cap: int) -> float:
    """Cosine plus a bonus for inliers above what unrelated pairs reach by chance (``floor``), saturating at
    ``cap``; a pair with no geometric support keeps its cosine, so copies with few keypoints are not lost."""
    if cap <= floor:
        raise ValueError("cap must exceed floor")
    bonus = min(max(inliers - floor, 0), cap - floor) / (cap - floor)
    return float(cosine + weight * bonus)
