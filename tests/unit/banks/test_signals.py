"""Signal parsing and PDQ: the names other tools use, the reference hex, and stability under edits."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.common.banks.pdq_index import PdqIndex
from services.common.banks.signals import MalformedSignal, default_item_id, parse_signal, pdq_hex


def _photo(seed: int = 0, size: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((8, 8, 3)) * 255
    img = Image.fromarray(base.astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def test_aliases_and_normalisation() -> None:
    s = parse_signal("HASH_PDQ", "AB" * 32)
    assert (s.kind, s.value, s.item_id) == ("pdq", "ab" * 32, default_item_id("pdq", "ab" * 32))
    assert parse_signal("md5", "0" * 32, "item-7").item_id == "item-7"
    with pytest.raises(MalformedSignal, match="64 hex"):
        parse_signal("pdq", "abc")
    with pytest.raises(MalformedSignal, match="unsupported signal type"):
        parse_signal("video_md5", "0" * 32)


def test_pdq_hex_is_the_reference_bit_order() -> None:
    pixels = _photo()
    value, quality = pdq_hex(pixels)
    import pdqhash

    bits, _ = pdqhash.compute(pixels)
    assert len(value) == 64 and quality > 50
    # Reference hex: bit 255 (the vector's first element) is the most significant bit of the first digit.
    assert int(value, 16) == int("".join(str(int(b)) for b in bits), 2)


def test_pdq_of_a_reencoded_copy_stays_within_the_threshold() -> None:
    pixels = _photo(3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=40)
    again = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    a, _ = pdq_hex(pixels)
    b, _ = pdq_hex(again)
    other, _ = pdq_hex(_photo(4))
    index = PdqIndex(31)
    index.add(a, "bank", "item")
    assert [h.owners for h in index.search(b)] == [frozenset({("bank", "item")})]
    assert index.search(other) == []


def test_uploads_are_pdq_hashed_near_what_other_tools_compute_on_the_original() -> None:
    """The moderator hashes a 512-pixel view, not the 256-pixel model input: the reference hashes the original."""
    from services.common.banks.images import image_signals
    from services.common.config import Settings

    rng = np.random.default_rng(11)
    detail = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    original = Image.fromarray(detail).resize((1024, 700), Image.Resampling.BICUBIC)
    reference, _ = pdq_hex(np.asarray(original))
    buf = io.BytesIO()
    original.save(buf, "JPEG", quality=92)
    ours = next(s.value for s in image_signals(buf.getvalue(), Settings()) if s.kind == "pdq")
    assert (int(reference, 16) ^ int(ours, 16)).bit_count() <= 12  # photo set: median 2, p90 10 bits
    gray = np.asarray(original.convert("L"))
    assert pdq_hex(gray)[0] == pdq_hex(np.repeat(gray[:, :, None], 3, axis=2))[0]


def test_each_signal_kind_carries_its_hasher_and_matching_mode() -> None:
    import io

    import skimage
    from PIL import Image

    from services.common.banks.signals import EXACT_KINDS, SIGNAL_KINDS, image_signals_of
    from services.common.config import Settings
    from services.common.prepared import PrepareSpec, prepare_image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, "JPEG")
    prepared = prepare_image(buf.getvalue(), PrepareSpec.of(Settings(), keypoints=False))
    signals = {s.kind: s.value for s in image_signals_of(prepared, "item-1")}
    # The banked image's signals are exactly what an upload of it is matched on.
    assert signals == {k: v for k, v in vars(prepared.signals()).items() if v is not None}
    assert [k.name for k in EXACT_KINDS] == ["sha256", "md5", "phash"] and not SIGNAL_KINDS["pdq"].exact
    for kind in SIGNAL_KINDS.values():
        assert len(kind.normalise(signals[kind.name].upper())) == kind.hex_length
