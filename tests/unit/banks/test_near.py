"""The banked-embedding rule on real photos: a look-alike with a high cosine but no shared geometry is not a
match, a copy the cosine undersells is, and without keypoints the cosine alone decides."""

from __future__ import annotations

import pytest
from PIL import Image
from skimage import data as skdata

from services.common.banks.near import BankEmbeddingRule
from services.common.config import BankSettings, DecisionSettings, VerificationSettings
from services.common.imaging import detail_view
from services.common.index.base import Neighbour
from services.common.thresholds import ThresholdResolver
from services.common.verification import FeatureExtractor, LocalFeatures, QueryFeatures, Verifier

THRESHOLD = 0.80


def _features(name: str, crop: bool = False) -> LocalFeatures:
    img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    if crop:
        w, h = img.size
        img = img.crop((int(w * 0.1), int(h * 0.1), int(w * 0.85), int(h * 0.85)))
    return FeatureExtractor("orb", 500).extract(detail_view(img, 512))


@pytest.fixture(scope="module")
def rule() -> BankEmbeddingRule:
    banks = BankSettings(embedding_thresholds={"m:1": THRESHOLD})
    return BankEmbeddingRule(ThresholdResolver(DecisionSettings(), banks), Verifier(VerificationSettings()))


def test_threshold_is_the_banks_own_then_the_versions_then_the_default(rule: BankEmbeddingRule) -> None:
    assert rule.threshold("m:1", 0.9) == 0.9
    assert rule.threshold("m:1", None) == THRESHOLD
    assert rule.threshold("m:9", None) == BankSettings().embedding_threshold
    assert rule.reach(THRESHOLD) == pytest.approx(THRESHOLD - VerificationSettings().weight)
    off = BankEmbeddingRule(
        ThresholdResolver(DecisionSettings(), BankSettings()), Verifier(VerificationSettings(enabled=False))
    )
    assert off.reach(THRESHOLD) == THRESHOLD  # nothing to lift a cosine below the threshold


def test_a_lookalike_fails_and_an_undersold_copy_passes_verification(rule: BankEmbeddingRule) -> None:
    banked = {"b/astronaut": _features("astronaut"), "b/coffee": _features("coffee")}
    assert min(len(f) for f in banked.values()) >= VerificationSettings().miss_min_keypoints  # both informative
    query = QueryFeatures(_features("astronaut", crop=True))
    # The embedding puts the stranger (coffee) above the threshold and the real copy below it.
    candidates = [Neighbour("b/coffee", 0.85), Neighbour("b/astronaut", 0.70)]
    thresholds = {c.upload_id: THRESHOLD for c in candidates}
    judged = {j.key: j for j in rule.judge(query, candidates, thresholds, banked)}
    stranger, copy = judged["b/coffee"], judged["b/astronaut"]
    assert not stranger.matched and stranger.inliers is not None
    assert stranger.score == pytest.approx(0.85 - VerificationSettings().miss_penalty)
    assert copy.matched and copy.inliers is not None and copy.inliers > 25 and copy.score > 0.85


def test_without_keypoints_the_cosine_decides(rule: BankEmbeddingRule) -> None:
    candidates = [Neighbour("b/x", 0.81), Neighbour("b/y", 0.79)]
    thresholds = {"b/x": THRESHOLD, "b/y": THRESHOLD}
    for query in (None, QueryFeatures(_features("astronaut"))):  # no query keypoints, or none banked
        judged = rule.judge(query, candidates, thresholds, {})
        assert [(j.key, j.matched, j.score, j.inliers) for j in judged] == [
            ("b/x", True, 0.81, None),
            ("b/y", False, 0.79, None),
        ]


def test_a_regions_cosine_counts_only_with_geometric_support(rule: BankEmbeddingRule) -> None:
    """A region near the upload lifts a verified copy; unverified, or without inliers, the whole image's cosine
    is the score (seven views give a look-alike seven chances)."""
    banked = {"b/astronaut": _features("astronaut"), "b/coffee": _features("coffee")}
    query = QueryFeatures(_features("astronaut", crop=True))
    candidates = [Neighbour("b/coffee", 0.83), Neighbour("b/astronaut", 0.78)]  # both best at a region
    thresholds = {c.upload_id: THRESHOLD for c in candidates}
    whole = {"b/coffee": 0.60, "b/astronaut": 0.55}
    judged = {j.key: j for j in rule.judge(query, candidates, thresholds, banked, whole)}
    stranger, copy = judged["b/coffee"], judged["b/astronaut"]
    assert not stranger.matched and stranger.score == pytest.approx(0.60 - VerificationSettings().miss_penalty)
    assert stranger.cosine == 0.83  # the region's cosine is still what the evidence shows
    assert copy.matched and copy.inliers is not None and copy.inliers > VerificationSettings().inlier_floor
    assert copy.score > 0.78  # the region's cosine, plus the bonus
    [unverified] = rule.judge(None, [Neighbour("b/x", 0.85)], {"b/x": THRESHOLD}, {}, {"b/x": 0.7})
    assert not unverified.matched and unverified.score == pytest.approx(0.7)
