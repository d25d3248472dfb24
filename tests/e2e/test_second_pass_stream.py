"""The second pass through the whole pipeline: copies the descriptor turns away are found by their keypoints."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageOps

from services.common.config import DecisionSettings, Settings
from services.common.photos.build import Manifest
from services.common.transforms import encode_jpeg
from tests.e2e.conftest import ModeratorProcess, originals_then_copies, pick_photos, write_photo


def _pasted_and_turned(photo: Image.Image, backdrop: Image.Image, seed: int) -> Image.Image:
    """The photo at half the width, pasted onto an unrelated picture, and the whole turned a quarter."""
    rng = random.Random(seed)
    back = ImageOps.fit(backdrop, (720, 560))
    inner = photo.copy()
    inner.thumbnail((int(back.width * rng.uniform(0.5, 0.6)), back.height))
    back.paste(inner, (rng.randint(0, back.width - inner.width), rng.randint(0, back.height - inner.height)))
    return back.transpose(rng.choice([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270]))


def test_keypoints_link_copies_the_descriptor_misses_and_nothing_else(
    settings: Settings,
    stack_env: dict[str, str],
    tmp_path: Path,
    photo_set: Manifest,
    moderators: list[ModeratorProcess],
) -> None:
    records = pick_photos(photo_set, 18, seed=41)
    originals = {
        f"orig-{n:03d}": write_photo(photo_set, r, tmp_path, f"orig-{n:03d}") for n, r in enumerate(records[:12])
    }
    backdrops = [photo_set.path_of(r) for r in records[12:]]  # never uploaded themselves
    copies: dict[str, tuple[Path, str]] = {}
    for n, (uid, path) in enumerate(list(originals.items())[:6]):
        with Image.open(path) as img, Image.open(backdrops[n]) as back:
            edited = _pasted_and_turned(img.convert("RGB"), back.convert("RGB"), seed=n)
        cpath = tmp_path / f"turned-{n:03d}.jpg"
        cpath.write_bytes(encode_jpeg(edited, 75))
        copies[f"turned-{n:03d}"] = (cpath, uid)

    verdicts = originals_then_copies(settings, stack_env, tmp_path, moderators, originals, copies)

    by_second_pass = linked = 0
    for uid, (_, original) in copies.items():
        verdict = verdicts[uid]
        matches = [str(d["upload_id"]) for d in verdict["duplicate_of"]]  # type: ignore[union-attr]
        assert all(m == original for m in matches), f"{uid} linked to the wrong upload: {matches}"
        linked += bool(matches)
        reasons = [str(r) for r in verdict["reasons"]]  # type: ignore[union-attr]
        hit = [r for r in reasons if r.startswith(f"keypoint_match:{original}:")]
        if hit:
            by_second_pass += 1
            evidence = {str(e["upload_id"]): e for e in verdict["evidence"]}  # type: ignore[union-attr]
            threshold = DecisionSettings().threshold_for(str(verdict["model_version"]))
            assert float(evidence[original]["cosine"]) < threshold <= float(evidence[original]["score"])  # type: ignore[arg-type]
            assert matches == [original], verdict
    seen = {u: (verdicts[u]["duplicate_of"], verdicts[u]["reasons"], verdicts[u]["evidence"]) for u in copies}
    # Measured with sieve_embedder:2: 4 of the 6 linked, one of them only by the second pass (its cosine was -0.23,
    # under any reach of the first pass); the two missed keep too few keypoints of the photo for either pass.
    # With :3: 3 of 6, one by the second pass (cosine -0.20, 166 inliers); a fourth fused to 0.662 against 0.668.
    assert linked >= 3, f"only {linked} of {len(copies)} linked: {seen}"
    assert by_second_pass >= 1, f"none of {len(copies)} found by the second pass: {seen}"
    for uid in originals:
        assert verdicts[uid]["duplicate_of"] == [], f"{uid} (an unrelated photo) was linked: {verdicts[uid]}"
