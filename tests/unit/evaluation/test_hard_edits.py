"""The hard benchmark's edits: reproducible from the query id, and as hard as they claim."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image
from skimage import data as skdata

from services.evaluation.hard_edits import HARD_FAMILIES, hard_family_edits, small_crop, strong_geometry


def _photo() -> Image.Image:
    return Image.fromarray(skdata.astronaut()).convert("RGB")


def _fillers() -> list[Image.Image]:
    return [Image.fromarray(skdata.coffee()).convert("RGB"), Image.fromarray(skdata.chelsea()).convert("RGB")]


def test_every_family_is_reproducible_from_its_seed_and_changes_the_image() -> None:
    edits = hard_family_edits(_fillers())
    assert set(edits) == set(HARD_FAMILIES)
    original = _photo()
    for family, edit in edits.items():
        first, name = edit(original.copy(), random.Random(f"q:{family}"))
        again, name_again = edit(original.copy(), random.Random(f"q:{family}"))
        assert name == name_again and np.array_equal(np.asarray(first), np.asarray(again)), family
        assert first.mode == "RGB" and min(first.size) >= 16
        same_size = first.size == original.size
        assert not same_size or np.abs(np.asarray(first, int) - np.asarray(original, int)).mean() > 2, family


def test_small_crops_keep_20_to_45_percent_of_the_area() -> None:
    original = _photo()
    for seed in range(20):
        cropped, name = small_crop(original, random.Random(seed))
        if "rescale" in name:
            continue
        area = cropped.width * cropped.height / (original.width * original.height)
        assert 0.18 <= area <= 0.47, (name, area)


def test_strong_geometry_rotates_at_least_30_degrees_or_warps() -> None:
    for seed in range(30):
        _, name = strong_geometry(_photo(), random.Random(seed))
        if name.startswith("rotate") and "_" not in name:
            assert abs(float(name.removeprefix("rotate"))) >= 30, name
        else:
            assert name.startswith(("perspective", "mirror+rotate", "rotate_")), name
