"""Local-feature verification of near-duplicate candidates: keypoints, geometric check, fused score.

A global descriptor ranks candidates; a geometric check with local features confirms the ones it is unsure of.
Crops, memes, rotations and screenshots keep many keypoints of the original in one consistent geometry, which a
single global vector loses. Features are computed once per image (when it enters the index) and kept in Redis.
"""

from services.common.imaging import detail_view
from services.common.verification.features import FeatureExtractor, LocalFeatures
from services.common.verification.keypoint_index import KeypointHit, KeypointIndex
from services.common.verification.matching import GeometricMatch, Verification, count_inliers, fuse, match_geometry
from services.common.verification.shared_keypoints import SharedKeypointIndex
from services.common.verification.store import FeatureStore
from services.common.verification.verifier import QueryFeatures, Verifier, rescored, verify_upload

__all__ = [
    "FeatureExtractor",
    "FeatureStore",
    "GeometricMatch",
    "KeypointHit",
    "KeypointIndex",
    "LocalFeatures",
    "QueryFeatures",
    "SharedKeypointIndex",
    "Verification",
    "Verifier",
    "count_inliers",
    "detail_view",
    "fuse",
    "match_geometry",
    "rescored",
    "verify_upload",
]
