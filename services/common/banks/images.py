"""The signals of an image to bank: the same hashes the moderator computes for an upload, under one item id."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from services.common.banks.signals import Signal, pdq_hex
from services.common.config import Settings
from services.common.hashing import informative_phash, md5_hex, phash_hex, sha256_hex
from services.common.imaging import DecodedImage, decode_image
from services.common.verification import FeatureExtractor, LocalFeatures


@dataclass(frozen=True)
class BankedImage:
    """What banking one image keeps: its hashes, the model input (embedded now, and again after each
    promotion) and its keypoints (so an embedding match is verified as the recent index verifies its own)."""

    signals: list[Signal]
    pixels: NDArray[np.uint8]
    features: LocalFeatures | None  # None when verification is off

    @property
    def item_id(self) -> str:
        return self.signals[0].item_id


def _decode(data: bytes, settings: Settings, detail_side: int) -> DecodedImage:
    """Decoded exactly as the moderator decodes uploads, so a banked image's PDQ is what its re-uploads hash to."""
    return decode_image(data, settings.decode, settings.triton.input_size, detail_side, pdq=True)


def _signals(data: bytes, decoded: DecodedImage, settings: Settings, item_id: str) -> list[Signal]:
    sha = sha256_hex(data)
    item = item_id or sha[:16]
    signals = [Signal("sha256", sha, item), Signal("md5", md5_hex(data), item)]
    phash = phash_hex(decoded.pixels)
    if informative_phash(phash):
        signals.append(Signal("phash", phash, item))
    assert decoded.pdq_view is not None
    pdq, quality = pdq_hex(decoded.pdq_view)
    if quality >= settings.banks.pdq_min_quality:
        signals.append(Signal("pdq", pdq, item))
    return signals


def image_signals(data: bytes, settings: Settings, item_id: str = "") -> list[Signal]:
    """sha256, md5, the 64-bit pHash (when informative) and PDQ (when its quality is enough to match on)."""
    return _signals(data, _decode(data, settings, 0), settings, item_id)


def banked_image(data: bytes, settings: Settings, item_id: str = "") -> BankedImage:
    """Everything banking an image needs, from one decode; keypoints on the same detail view as uploads'."""
    verify = settings.verify
    decoded = _decode(data, settings, verify.detail_side if verify.enabled else 0)
    features = None
    if decoded.detail is not None:
        features = FeatureExtractor(verify.kind, verify.max_features).extract(decoded.detail)
    pixels = np.ascontiguousarray(decoded.pixels, dtype=np.uint8)
    return BankedImage(_signals(data, decoded, settings, item_id), pixels, features)
