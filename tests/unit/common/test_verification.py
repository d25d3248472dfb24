"""Local-feature verification on real photos (scikit-image ships them): copies gain inliers, strangers do not."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from services.common.config import VerificationSettings
from services.common.imaging import detail_view
from services.common.index.base import Neighbour
from services.common.verification import (
    FeatureExtractor,
    LocalFeatures,
    QueryFeatures,
    Verifier,
    count_inliers,
    fuse,
    rescored,
)


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).convert("RGB")


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor("orb", 500)


def _features(extractor: FeatureExtractor, img: Image.Image) -> LocalFeatures:
    return extractor.extract(detail_view(img, 512))


def test_features_round_trip_through_bytes(extractor: FeatureExtractor) -> None:
    feats = _features(extractor, _photo("astronaut"))
    back = LocalFeatures.from_bytes(feats.to_bytes())
    assert len(back) == len(feats) > 100
    assert back.kind == "orb" and (back.width, back.height) == (feats.width, feats.height)
    assert np.array_equal(back.descriptors, feats.descriptors)
    assert np.abs(back.points - feats.points).max() < 0.5  # float16 keeps positions to well under RANSAC's 5 px


def test_a_garbled_record_is_refused() -> None:
    with pytest.raises(ValueError):
        LocalFeatures.from_bytes(b"XXXX" + bytes(40))


def test_a_small_rotated_crop_keeps_many_inliers_and_a_stranger_gets_none(extractor: FeatureExtractor) -> None:
    original = _photo("astronaut")
    w, h = original.size
    copy = original.crop((int(w * 0.2), int(h * 0.1), int(w * 0.75), int(h * 0.65))).rotate(55, expand=True)
    reference = _features(extractor, original)
    assert count_inliers(_features(extractor, copy), reference) >= 25
    assert count_inliers(_features(extractor, _photo("coffee")), reference) < 12


def test_a_mirrored_copy_is_found_through_the_mirrored_query(extractor: FeatureExtractor) -> None:
    original = _photo("chelsea")
    flipped = original.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    reference = _features(extractor, original)
    gray = detail_view(flipped, 512)
    assert count_inliers(extractor.extract_mirrored(gray), reference) > count_inliers(
        extractor.extract(gray), reference
    )
    verifier = Verifier(VerificationSettings(mirror_top_k=1))
    query = QueryFeatures(extractor.extract(gray), lambda: extractor.extract_mirrored(gray))
    [result] = verifier.verify(query, [Neighbour("orig", 0.4)], {"orig": reference})
    assert result.mirrored and result.inliers > verifier.settings.inlier_floor
    assert result.score > 0.4


def test_fuse_adds_a_bonus_only_above_the_floor_and_saturates_at_the_cap() -> None:
    assert fuse(0.4, 10, weight=0.5, floor=12, cap=50) == pytest.approx(0.4)
    assert fuse(0.4, 31, weight=0.5, floor=12, cap=50) == pytest.approx(0.4 + 0.5 * 19 / 38)
    assert fuse(0.4, 500, weight=0.5, floor=12, cap=50) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        fuse(0.4, 10, weight=0.5, floor=50, cap=50)


def test_a_miss_costs_the_penalty_only_between_keypoint_rich_images() -> None:
    assert fuse(0.8, 3, weight=0.5, floor=12, cap=50, miss_penalty=0.1) == pytest.approx(0.7)
    assert fuse(0.8, 31, weight=0.5, floor=12, cap=50, miss_penalty=0.1) == pytest.approx(0.8 + 0.25)
    verifier = Verifier(VerificationSettings(miss_penalty=0.1, miss_min_keypoints=300))
    assert verifier.score(0.8, 0, 500, 450) == pytest.approx(0.7)  # the check had every chance and found nothing
    assert verifier.score(0.8, 0, 500, 40) == pytest.approx(0.8)  # a flat reference: no evidence either way
    assert verifier.score(0.8, 0, 120, 500) == pytest.approx(0.8)


def test_a_stranger_rich_in_keypoints_loses_score_and_a_copy_gains(extractor: FeatureExtractor) -> None:
    verifier = Verifier(VerificationSettings())
    query = QueryFeatures(_features(extractor, _photo("astronaut").crop((60, 40, 480, 420))))
    references = {"copy": _features(extractor, _photo("astronaut")), "stranger": _features(extractor, _photo("coffee"))}
    assert min(len(query.features), len(references["stranger"])) >= 300  # both rich: the miss is informative
    out = {
        v.upload_id: v for v in verifier.verify(query, [Neighbour("copy", 0.6), Neighbour("stranger", 0.6)], references)
    }
    assert out["copy"].score > 0.6 + 0.4 and out["stranger"].score == pytest.approx(0.5)


def test_candidates_are_the_nearest_unless_the_best_is_already_sure() -> None:
    verifier = Verifier(VerificationSettings(top_k=2, sure_margin=0.1))
    near = [Neighbour("a", 0.6), Neighbour("b", 0.5), Neighbour("c", 0.4)]
    assert [n.upload_id for n in verifier.candidates(near, threshold=0.65)] == ["a", "b"]
    assert verifier.candidates([Neighbour("a", 0.8)], threshold=0.65) == []
    assert Verifier(VerificationSettings(enabled=False)).candidates(near, threshold=0.65) == []


def test_candidates_that_no_inlier_bonus_could_lift_into_the_decision_band_are_not_verified() -> None:
    verifier = Verifier(VerificationSettings(top_k=5, weight=0.5, cosine_floor=None))
    near = [Neighbour("a", 0.40), Neighbour("b", 0.20), Neighbour("c", 0.16), Neighbour("d", 0.10)]
    # threshold 0.69: a full bonus (0.5) lifts 0.20 to 0.70, but 0.16 only to 0.66
    assert [n.upload_id for n in verifier.candidates(near, threshold=0.69)] == ["a", "b"]
    # the review band starts 0.03 below the threshold: 0.16 + 0.5 = 0.66 reaches it
    assert [n.upload_id for n in verifier.candidates(near, threshold=0.69, band=0.03)] == ["a", "b", "c"]
    # with a cosine floor of 0.25, geometry alone lifts any cosine to 0.75: every one of the top k is worth it
    floored = Verifier(VerificationSettings(top_k=5, weight=0.5, cosine_floor=0.25))
    assert [n.upload_id for n in floored.candidates(near, threshold=0.69)] == ["a", "b", "c", "d"]
    assert floored.reach(0.80) == pytest.approx(0.30)  # 0.25 + 0.5 falls short of 0.80: the cosine must help


def test_with_a_cosine_floor_geometry_alone_carries_a_copy_the_descriptor_turned_away() -> None:
    # a quarter turn: cosine -0.2, yet 60 inliers on one homography
    assert fuse(-0.2, 60, 0.5, 12, 50, cosine_floor=0.25) == pytest.approx(0.75)
    assert fuse(-0.2, 60, 0.5, 12, 50) == pytest.approx(0.3)
    # no geometric support: the floor does not apply, the cosine (and any miss penalty) stands
    assert fuse(-0.2, 12, 0.5, 12, 50, miss_penalty=0.1, cosine_floor=0.25) == pytest.approx(-0.3)
    # chance-level geometry (32 inliers, the most two different pictures reached on validation) stays short of 0.6
    assert fuse(0.0, 32, 0.5, 12, 50, cosine_floor=0.25) < 0.6


def test_ratio_matches_are_those_of_opencvs_brute_force_matcher(extractor: FeatureExtractor) -> None:
    """The FAISS search behind the ratio test must find exactly what cv2.BFMatcher finds, copy or stranger."""
    import cv2

    from services.common.verification.matching import _ratio_matches

    original = _features(extractor, _photo("astronaut"))
    copy = _features(extractor, _photo("astronaut").rotate(20, expand=True).resize((400, 380)))
    stranger = _features(extractor, _photo("coffee"))
    for kind, make in (("orb", extractor), ("sift", FeatureExtractor("sift", 300))):
        norm = cv2.NORM_HAMMING if kind == "orb" else cv2.NORM_L2
        pairs = (
            [(original, copy), (original, stranger)]
            if kind == "orb"
            else [
                (_features(make, _photo("astronaut")), _features(make, _photo("astronaut").resize((300, 300)))),
                (_features(make, _photo("astronaut")), _features(make, _photo("coffee"))),
            ]
        )
        for query, reference in pairs:
            q_desc, r_desc = query.descriptors, reference.descriptors
            if kind == "sift":
                q_desc, r_desc = q_desc.astype(np.float32), r_desc.astype(np.float32)
            knn = cv2.BFMatcher(norm).knnMatch(q_desc, r_desc, k=2)
            expected = [
                (p[0].queryIdx, p[0].trainIdx) for p in knn if len(p) == 2 and p[0].distance < 0.75 * p[1].distance
            ]
            q_idx, r_idx = _ratio_matches(query, reference, 0.75)
            assert list(zip(q_idx.tolist(), r_idx.tolist(), strict=True)) == expected
        assert len(_ratio_matches(*pairs[0], 0.75)[0]) > 30  # the copy: plenty of matches to compare


def test_neighbours_without_features_keep_their_cosine_and_order_follows_fused_scores(
    extractor: FeatureExtractor,
) -> None:
    original = _photo("astronaut")
    w, h = original.size
    copy = original.crop((0, 0, w // 2, h // 2)).rotate(40, expand=True)
    verifier = Verifier(VerificationSettings())
    neighbours = [Neighbour("stranger", 0.55), Neighbour("orig", 0.35), Neighbour("unknown", 0.3)]
    references = {"orig": _features(extractor, original), "stranger": _features(extractor, _photo("coffee"))}
    verified = verifier.verify(QueryFeatures(_features(extractor, copy)), neighbours, references)
    assert {v.upload_id for v in verified} == {"orig", "stranger"}
    ranked = rescored(neighbours, verified)
    assert ranked[0].upload_id == "orig" and ranked[0].score > 0.55
    assert next(n for n in ranked if n.upload_id == "unknown").score == 0.3


def test_a_thumbnail_is_enlarged_before_its_keypoints_are_found() -> None:
    """ORB finds next to nothing in a 90-pixel crop; enlarged to min_side first, the crop has keypoints enough to
    verify against its original, reported in the thumbnail's own pixels."""
    photo = _photo("astronaut")
    thumb = photo.crop((100, 40, 400, 340)).resize((90, 90))
    gray = detail_view(thumb, 512)
    plain = FeatureExtractor("orb", 500).extract(gray)
    enlarged = FeatureExtractor("orb", 500, min_side=320).extract(gray)
    assert len(plain) < 40 < len(enlarged)
    assert (enlarged.width, enlarged.height) == (90, 90)
    assert enlarged.points.min() >= 0 and enlarged.points.max() < 90
    reference = FeatureExtractor("orb", 500, min_side=320).extract(detail_view(photo, 512))
    assert count_inliers(enlarged, reference) > VerificationSettings().inlier_floor >= count_inliers(plain, reference)


def test_only_an_undersold_pair_is_worth_its_regions_and_a_closer_cosine_keeps_its_geometry() -> None:
    from services.common.verification import Verification

    cfg = VerificationSettings()
    verifier = Verifier(cfg)
    floor = cfg.inlier_floor
    assert verifier.undersold(floor + 9, 0.5, 0.67)  # geometry agrees, the score falls short
    assert not verifier.undersold(floor, 0.5, 0.67)  # no geometry: a look-alike as likely as a copy
    assert not verifier.undersold(None, 0.5, 0.67)  # never verified
    assert not verifier.undersold(floor + 9, 0.7, 0.67)  # matched already
    assert not Verifier(VerificationSettings(query_regions=False)).undersold(floor + 9, 0.5, 0.67)
    pair = Verification("ref", 0.35, floor + 9, False, verifier.score(0.35, floor + 9))
    closer = verifier.closer(pair, 0.93)
    assert (closer.upload_id, closer.inliers, closer.cosine) == ("ref", floor + 9, 0.93)
    assert closer.score == pytest.approx(pair.score + 0.93 - 0.35)  # the inlier bonus stands
    assert verifier.closer(pair, 0.2) is pair  # a region further than the whole changes nothing
