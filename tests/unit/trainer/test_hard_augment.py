"""The hard training policy and its composition primitives: what each edit does to the photo, and that a view
is reproducible from its seed (cached views and resumed runs depend on it)."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from services.trainer.augment import (
    HardAugment,
    caption_bands,
    gamma,
    paste_into,
    pixelate,
    quarter_turn,
    tile_grid,
)


def _photo(w: int = 120, h: int = 80, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_quarter_turns_swap_the_sides_and_four_turns_are_the_identity() -> None:
    img = _photo()
    assert quarter_turn(img, 1).size == (80, 120) and quarter_turn(img, 2).size == (120, 80)
    assert np.array_equal(np.asarray(quarter_turn(img, 4)), np.asarray(img))
    assert np.array_equal(np.asarray(quarter_turn(quarter_turn(img, 1), 3)), np.asarray(img))


def test_a_collage_holds_the_photo_in_its_slot_and_other_pictures_elsewhere() -> None:
    photo = Image.new("RGB", (50, 50), (255, 0, 0))
    other = Image.new("RGB", (50, 50), (0, 0, 255))
    out = np.asarray(tile_grid(photo, [other], cols=2, rows=2, tile=40, gap=4, slot=3, fill=(0, 0, 0)))
    assert out.shape == (2 * 40 + 3 * 4, 2 * 40 + 3 * 4, 3)
    assert tuple(out[4 + 40 + 4 + 20, 4 + 40 + 4 + 20]) == (255, 0, 0)  # slot 3: bottom right
    assert tuple(out[4 + 20, 4 + 20]) == (0, 0, 255)  # slot 0: a filler
    assert tuple(out[1, 1]) == (0, 0, 0)  # the gap


def test_a_picture_in_picture_keeps_the_background_size_and_shows_the_photo_at_its_share() -> None:
    photo = Image.new("RGB", (100, 100), (255, 0, 0))
    back = Image.new("RGB", (400, 300), (0, 255, 0))
    out = np.asarray(paste_into(photo, back, width_frac=0.5, degrees=0.0, pos=(0.0, 0.0)))
    assert out.shape == (300, 400, 3)
    red = (out == (255, 0, 0)).all(axis=2)
    assert abs(int(red.any(axis=0).sum()) - 200) <= 2  # half the background's width
    assert tuple(out[-1, -1]) == (0, 255, 0)


def test_a_meme_adds_captioned_bands_above_and_below() -> None:
    img = _photo(200, 100)
    out = caption_bands(img, 0.3, 0.2, ["top words", "bottom"], "DejaVuSans-Bold.ttf", (255, 255, 255))
    assert out.size == (200, 100 + 30 + 20)
    band = np.asarray(out)[:30]
    assert (band < 128).any() and (band == 255).mean() > 0.5  # dark ink on a white band
    assert np.array_equal(np.asarray(out)[30:130], np.asarray(img))


def test_photometric_primitives_change_pixels_but_not_the_size() -> None:
    img = _photo()
    for edited in (gamma(img, 2.0), pixelate(img, 0.2)):
        assert edited.size == img.size and not np.array_equal(np.asarray(edited), np.asarray(img))
    assert np.asarray(gamma(img, 2.0)).mean() < np.asarray(img).mean()  # gamma > 1 darkens


def test_a_view_is_a_function_of_its_seed_and_views_differ_from_each_other() -> None:
    photo = _photo(300, 200, 1)
    policy = HardAugment([_photo(200, 200, 2), _photo(200, 200, 3)])
    views = [policy(photo, random.Random(seed)) for seed in range(12)]
    again = [policy(photo, random.Random(seed)) for seed in range(12)]
    for (a, fa), (b, fb) in zip(views, again, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(fa, fb)
        assert a.mode == "RGB" and fa.shape == (len(HardAugment.categories),)
    assert len({np.asarray(v.resize((16, 16))).tobytes() for v, _ in views}) == 12
