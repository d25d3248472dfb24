"""The hash-bank benchmark's edits: each is a real re-upload edit, and the caption bar changes the frame."""

from __future__ import annotations

import numpy as np
from PIL import Image

from bench.hash_banks import EDITS, caption


def test_every_edit_gives_an_rgb_image() -> None:
    img = Image.fromarray((np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8))
    for name, edit in EDITS.items():
        out = edit(img)
        assert out.mode == "RGB" and min(out.size) >= 16, name


def test_caption_adds_a_bar_above() -> None:
    img = Image.new("RGB", (120, 90), (0, 128, 0))
    out = caption()(img)
    assert out.size == (120, 90 + 24)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((60, 100)) == (0, 128, 0)
