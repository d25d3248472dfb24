"""Hard edits through the whole pipeline: the verification stage links what the descriptor alone misses."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from services.common.config import DecisionSettings, Settings, VerificationSettings
from services.common.photos.build import Manifest
from services.common.transforms import encode_jpeg
from services.evaluation.hard_edits import small_crop, strong_geometry
from tests.e2e.conftest import ModeratorProcess, originals_then_copies, pick_photos, write_photo


def _hard_copy(image: Image.Image, seed: int) -> Image.Image:
    """A small crop (20-45% of the area), then a rotation of 30-90° or a strong perspective."""
    rng = random.Random(seed)
    cropped, _ = small_crop(image, rng)
    edited, _ = strong_geometry(cropped, rng)
    return edited


def test_hard_copies_are_linked_with_keypoint_evidence(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    records = pick_photos(photo_set, 14, seed=23)
    originals = {f"orig-{n:03d}": write_photo(photo_set, r, tmp_path, f"orig-{n:03d}") for n, r in enumerate(records)}
    copies: dict[str, tuple[Path, str]] = {}
    for n, (uid, path) in enumerate(list(originals.items())[:8]):
        with Image.open(path) as img:
            edited = _hard_copy(img.convert("RGB"), seed=n)
        cpath = tmp_path / f"hard-{n:03d}.jpg"
        cpath.write_bytes(encode_jpeg(edited, 80))
        copies[f"hard-{n:03d}"] = (cpath, uid)

    verdicts = originals_then_copies(settings, stack_env, tmp_path, moderators, originals, copies)

    floor = VerificationSettings().inlier_floor
    found = by_keypoints = 0
    for uid, (_, original) in copies.items():
        verdict = verdicts[uid]
        matches = [str(d["upload_id"]) for d in verdict["duplicate_of"]]  # type: ignore[union-attr]
        assert all(m == original for m in matches), f"{uid} linked to the wrong upload: {matches}"
        evidence = {str(e["upload_id"]): e for e in verdict["evidence"]}  # type: ignore[union-attr]
        found += bool(matches)
        verified = evidence.get(original)
        if matches and verified is not None and int(verified["inliers"]) > floor:  # type: ignore[call-overload]
            by_keypoints += 1
            assert float(verified["score"]) > float(verified["cosine"])  # type: ignore[arg-type]
            threshold = DecisionSettings().threshold_for(str(verdict["model_version"]))
            if float(verified["cosine"]) < threshold:  # type: ignore[arg-type]
                # the channel that found it: the descriptor's neighbours, or the keypoint vote (second pass)
                said = {f"{kind}:{original}:{verified['inliers']}" for kind in ("verified_match", "keypoint_match")}
                assert said & set(verdict["reasons"]), verdict  # type: ignore[arg-type]
    # Measured: 6 of 8 with sieve_embedder:2, 5 of 8 with :3 (better on the hard benchmark's 465 copies, 0.931
    # against 0.923 F1; one copy here moved just under the threshold).
    assert found >= 5, f"only {found} of {len(copies)} hard copies linked"
    assert by_keypoints >= 3, f"only {by_keypoints} links carry keypoint evidence"
    for uid in originals:
        assert verdicts[uid]["duplicate_of"] == [], f"{uid} (an unrelated photo) was linked: {verdicts[uid]}"
