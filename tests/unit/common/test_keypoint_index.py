"""The second pass's keypoint channel on real photos: an edited copy votes for its original, strangers do not."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance
from skimage import data as skdata

from services.common.config import VerificationSettings
from services.common.imaging import detail_view
from services.common.verification import FeatureExtractor, KeypointIndex, LocalFeatures, Verifier

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "clock", "immunohistochemistry", "brick", "gravel")


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).convert("RGB")


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor("orb", 500)


def _features(extractor: FeatureExtractor, img: Image.Image) -> LocalFeatures:
    return extractor.extract(detail_view(img, 512))


@pytest.fixture(scope="module")
def index(extractor: FeatureExtractor) -> KeypointIndex:
    built = Verifier(VerificationSettings()).keypoint_index()  # as served: the vocabulary's inverted lists
    for name in PHOTOS:
        assert built.add(name, _features(extractor, _photo(name)), 1000.0)
    return built


def _meme(img: Image.Image) -> Image.Image:
    """A chain of edits: crop, rotation, colour, then the photo as half of a captioned canvas."""
    w, h = img.size
    out = img.crop((int(w * 0.15), int(h * 0.1), int(w * 0.8), int(h * 0.85))).rotate(25, expand=True)
    out = ImageEnhance.Color(out).enhance(1.6)
    canvas = Image.new("RGB", (out.width * 2, out.height + 120), (255, 255, 255))
    canvas.paste(out, (out.width // 2, 120))
    ImageDraw.Draw(canvas).rectangle((0, 0, canvas.width, 60), fill=(10, 10, 10))
    return canvas


def test_strongest_keypoints_come_first(extractor: FeatureExtractor) -> None:
    gray = detail_view(_photo("astronaut"), 512)
    keypoints = extractor._detector.detect(gray, None)
    feats = extractor.extract(gray)
    assert len(feats) == len(keypoints) > 256
    strongest = max(keypoints, key=lambda kp: kp.response)
    assert np.allclose(feats.points[0], strongest.pt)


def test_an_edited_copy_votes_for_its_original_first(extractor: FeatureExtractor, index: KeypointIndex) -> None:
    for name in ("astronaut", "chelsea", "rocket"):
        hits = index.search(_features(extractor, _meme(_photo(name))), top=3, min_votes=8)
        assert hits and hits[0].upload_id == name, (name, hits)
        assert all(hits[0].votes > h.votes for h in hits[1:])


def test_a_stranger_gathers_too_few_votes_to_be_a_candidate(extractor: FeatureExtractor, index: KeypointIndex) -> None:
    stranger = _features(extractor, _photo("hubble_deep_field"))
    assert index.search(stranger, top=5, min_votes=8) == []


@pytest.mark.parametrize("probes", [0, 16])  # the exact scan, and the vocabulary's inverted lists
def test_excluded_and_removed_references_are_not_proposed(extractor: FeatureExtractor, probes: int) -> None:
    index = KeypointIndex(probes=probes)
    copy = _features(extractor, _meme(_photo("coffee")))
    index.add("coffee", _features(extractor, _photo("coffee")), 10.0)
    index.add("coffee-again", _features(extractor, _photo("coffee")), 20.0)
    assert not index.add("coffee", _features(extractor, _photo("coffee")), 30.0)  # redelivery: once
    assert {h.upload_id for h in index.search(copy, 5, 8)} == {"coffee", "coffee-again"}
    assert [h.upload_id for h in index.search(copy, 5, 8, exclude={"coffee"})] == ["coffee-again"]
    assert index.evict_older_than(15.0) == 1
    assert [h.upload_id for h in index.search(copy, 5, 8)] == ["coffee-again"]
    assert index.remove(["coffee-again"]) == 1
    assert len(index) == 0 and index.descriptors == 0 and index.search(copy, 5, 8) == []


def test_only_the_strongest_descriptors_of_each_reference_are_held(extractor: FeatureExtractor) -> None:
    index = KeypointIndex(per_image=100)
    feats = _features(extractor, _photo("astronaut"))
    index.add("a", feats, 0.0)
    assert index.descriptors == 100 < len(feats)
    assert index.memory_bytes() == 100 * (32 + 8)


def test_the_second_pass_runs_unless_a_candidate_is_surely_a_copy() -> None:
    verifier = Verifier(VerificationSettings(second_pass_margin=0.1))
    assert verifier.needs_second_pass(None, 0.7)  # no candidate at all
    assert verifier.needs_second_pass(0.75, 0.7)  # over the threshold, but not by the margin
    assert not verifier.needs_second_pass(0.81, 0.7)
    assert not Verifier(VerificationSettings(second_pass=False)).needs_second_pass(None, 0.7)


def _tally_by_loop(
    distances: np.ndarray, slots: np.ndarray, max_distance: int, neighbours: int
) -> list[tuple[int, int]]:
    """The rule as first written, one descriptor at a time: the specification the vectorised tally must meet."""
    votes: dict[int, int] = {}
    for row_distances, row_slots in zip(distances, slots, strict=True):
        seen: list[int] = []
        for distance, slot in zip(row_distances.tolist(), row_slots.tolist(), strict=True):
            if distance > max_distance or slot < 0 or slot in seen:
                continue
            seen.append(slot)
            if len(seen) > neighbours:
                break
            votes[slot] = votes.get(slot, 0) + 1
    return sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))


def test_the_vectorised_tally_counts_votes_as_the_rule_says() -> None:
    from services.common.verification.keypoint_index import tally

    rng = np.random.default_rng(3)
    for _ in range(50):
        rows, k = int(rng.integers(1, 300)), int(rng.integers(1, 17))
        distances = np.sort(rng.integers(0, 90, (rows, k)), axis=1).astype(np.int32)
        slots = rng.integers(-1, 12, (rows, k)).astype(np.int64)  # few references: repeats within a row
        slots[distances > 80] = -1  # FAISS pads a short row with -1
        for neighbours in (1, 4):
            assert tally(distances, slots, 40, neighbours) == _tally_by_loop(distances, slots, 40, neighbours)
