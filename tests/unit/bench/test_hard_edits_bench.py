"""The hard benchmark's set builder: one picture shipped twice is one original, and groups stay together."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from skimage import data as skdata

from services.common.calibration import background_similarity, normalised
from services.evaluation.hard_set import build_set, merge_identical
from services.evaluation.hard_sources import SourceImage


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_the_same_photo_at_two_sizes_becomes_one_group() -> None:
    big = Image.fromarray(skdata.astronaut()).convert("RGB")
    small = big.resize((200, 200))
    other = Image.fromarray(skdata.coffee()).convert("RGB")
    merged = merge_identical(
        [SourceImage("a", _jpeg(big), "ga"), SourceImage("b", _jpeg(small), "gb"), SourceImage("c", _jpeg(other), "gc")]
    )
    assert [m.group for m in merged] == ["ga", "ga", "gc"]


def test_queries_of_one_group_are_all_positives_or_all_negatives() -> None:
    photos = [Image.fromarray(getattr(skdata, n)()).convert("RGB") for n in ("astronaut", "coffee", "chelsea")]
    originals = [SourceImage(f"p{i}", _jpeg(p), "shared" if i < 2 else "alone") for i, p in enumerate(photos)]
    hard = build_set("t", originals, [], [photos[0]], seed=1, reference_fraction=0.5)
    in_db = {t for t in hard.truth if t}
    shared = {"p0", "p1"} & set(hard.ref_ids)
    assert shared in (set(), {"p0", "p1"})
    assert len(hard.query_ids) == 5 * len(originals) and in_db <= set(hard.ref_ids)


def test_normalisation_discounts_queries_that_resemble_everything() -> None:
    rng = np.random.default_rng(0)
    background = rng.normal(size=(50, 8)).astype(np.float32)
    background /= np.linalg.norm(background, axis=1, keepdims=True)
    generic = background[:10].mean(axis=0)
    generic /= np.linalg.norm(generic)
    odd = rng.normal(size=8).astype(np.float32)
    odd /= np.linalg.norm(odd)
    kth = background_similarity(np.stack([generic, odd]), background, k=3)
    assert kth[0] > kth[1]
    scores = normalised(np.array([[0.8], [0.8]]), kth, beta=1.0, centre=float(kth.mean()))
    assert scores[0, 0] < 0.8 < scores[1, 0]
