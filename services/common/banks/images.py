"""The signals of an image to bank: the same hashes the moderator computes for an upload, under one item id."""

from __future__ import annotations

from services.common.banks.signals import Signal, pdq_hex
from services.common.config import Settings
from services.common.hashing import informative_phash, md5_hex, phash_hex, sha256_hex
from services.common.imaging import decode_image


def image_signals(data: bytes, settings: Settings, item_id: str = "") -> list[Signal]:
    """sha256, md5, the 64-bit pHash (when informative) and PDQ (when its quality is enough to match on).

    Decoded exactly as the moderator decodes uploads, so a banked image's PDQ is what its re-uploads hash to.
    """
    sha = sha256_hex(data)
    item = item_id or sha[:16]
    signals = [Signal("sha256", sha, item), Signal("md5", md5_hex(data), item)]
    decoded = decode_image(data, settings.decode, settings.triton.input_size, pdq=True)
    phash = phash_hex(decoded.pixels)
    if informative_phash(phash):
        signals.append(Signal("phash", phash, item))
    assert decoded.pdq_view is not None
    pdq, quality = pdq_hex(decoded.pdq_view)
    if quality >= settings.banks.pdq_min_quality:
        signals.append(Signal("pdq", pdq, item))
    return signals
