"""Geometric check of one candidate pair, and the fused score that the decision thresholds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import faiss
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
    q_idx, r_idx = _ratio_matches(query, reference, ratio)
    if len(q_idx) < MIN_MATCHES:
        return _NO_MATCH
    src = query.points[q_idx].reshape(-1, 1, 2)
    dst = reference.points[r_idx].reshape(-1, 1, 2)
    cv2.setRNGSeed(0)  # the same pair gives the same count on every replica and every redelivery
    homography, mask = cv2.findHomography(src, dst, cv2.RANSAC, ransac_px, maxIters=1000, confidence=0.995)
    if homography is None or mask is None or not _plausible(homography):
        return _NO_MATCH
    keep = mask.ravel().astype(bool)
    return GeometricMatch(src.reshape(-1, 2)[keep], dst.reshape(-1, 2)[keep])


def _ratio_matches(
    query: LocalFeatures, reference: LocalFeatures, ratio: float
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Lowe's ratio test on exact two-nearest neighbours: (query rows, reference rows) of the matches that pass.

    FAISS's flat indexes give the same neighbours as OpenCV's brute-force matcher, ~4x faster for 500 x 500 ORB
    descriptors (one core: 0.9 ms against 3.8 ms a pair), which is most of verification's cost.
    """
    if query.kind == "orb":
        index: Any = faiss.IndexBinaryFlat(query.descriptors.shape[1] * 8)
        index.add(np.ascontiguousarray(reference.descriptors, dtype=np.uint8))
        distances, rows = index.search(np.ascontiguousarray(query.descriptors, dtype=np.uint8), 2)
        distances = distances.astype(np.float32)
    else:
        index = faiss.IndexFlatL2(query.descriptors.shape[1])
        index.add(np.ascontiguousarray(reference.descriptors, dtype=np.float32))
        squared, rows = index.search(np.ascontiguousarray(query.descriptors, dtype=np.float32), 2)
        distances = np.sqrt(np.maximum(squared, 0.0))
    keep = (rows[:, 1] >= 0) & (distances[:, 0] < ratio * distances[:, 1])
    return np.flatnonzero(keep), rows[keep, 0].astype(np.int64)


def _plausible(homography: NDArray[Any]) -> bool:
    """Rejects warps no edit produces (a reflection, a collapse to a line, a 50x zoom): those are chance fits."""
    det = float(np.linalg.det(homography[:2, :2]))
    return 1.0 / 50.0 < abs(det) < 50.0 and det > 0


def fuse(
    cosine: float,
    inliers: int,
    weight: float,
    floor: int,
    cap: int,
    miss_penalty: float = 0.0,
    cosine_floor: float | None = None,
) -> float:
    """Cosine plus a bonus for inliers above what unrelated pairs reach by chance (``floor``), saturating at
    ``cap``. A pair with no geometric support keeps its cosine, so copies with few keypoints are not lost, unless
    the caller says the check was informative (both images rich in keypoints): then a miss costs ``miss_penalty``.
    Measured on the hard validation set: every false match at the served threshold had a high cosine and no
    inliers, most between two keypoint-rich images.

    With geometric support, the cosine counts from ``cosine_floor`` up: a copy turned 90° or cut out of a collage
    can score a cosine near zero under the descriptor while dozens of keypoints agree on one homography, and that
    geometry alone is the evidence (on the hard validation set, pairs of different pictures reached at most 32
    inliers, 15 at the 99.9th percentile).
    """
    if cap <= floor:
        raise ValueError("cap must exceed floor")
    bonus = min(max(inliers - floor, 0), cap - floor) / (cap - floor)
    missed = miss_penalty if inliers <= floor else 0.0
    base = max(cosine, cosine_floor) if cosine_floor is not None and bonus > 0 else cosine
    return float(base + weight * bonus - missed)
