"""One decode of an image's bytes into everything later stages use: the model input, the hashes banks match on,
and the keypoints verification compares.

Pure and picklable, so the moderator runs it in worker processes (threads would serialise on the GIL), and the one
function both moderating an upload and banking an image call: a banked image hashes exactly as its re-uploads do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

from services.common.banks.signals import SIGNAL_KINDS, pdq_hex
from services.common.banks.store import UploadSignals
from services.common.config import DecodeSettings, Settings
from services.common.hashing import md5_hex, phash_hex, sha256_hex
from services.common.imaging import decode_image
from services.common.timing import elapsed_ms
from services.common.verification.features import FeatureExtractor, FeatureKind, LocalFeatures


@dataclass(frozen=True)
class PrepareSpec:
    """What ``prepare_image`` needs from the settings, small enough to send to a worker with every image."""

    decode: DecodeSettings
    input_size: int
    detail_side: int  # 0: no detail view and no keypoints (verification off)
    pdq_min_quality: int
    feature_kind: FeatureKind = "orb"
    max_features: int = 500
    min_side: int = 0  # views smaller than this are enlarged before keypoints are found (FeatureExtractor)

    @classmethod
    def of(cls, settings: Settings, keypoints: bool = True) -> PrepareSpec:
        verify = settings.verify
        return cls(
            decode=settings.decode,
            input_size=settings.triton.input_size,
            detail_side=verify.detail_side if verify.enabled and keypoints else 0,
            pdq_min_quality=settings.banks.pdq_min_quality,
            feature_kind=verify.kind,
            max_features=verify.max_features,
            min_side=verify.min_side,
        )


@dataclass(frozen=True)
class PreparedImage:
    sha256: str
    md5: str
    phash: str
    pdq: str  # "" when the image is too flat for PDQ to mean anything (quality below the setting)
    pixels: NDArray[np.uint8]  # the model input
    detail: NDArray[np.uint8] | None  # grayscale, aspect kept: keypoints (and mirrored keypoints) come from it
    format: str
    features: LocalFeatures | None
    decode_ms: float
    features_ms: float

    def signals(self) -> UploadSignals:
        """What the banks are matched on: every signal kind's hash that carries information."""
        return UploadSignals(**{name: kind.hash(self) for name, kind in SIGNAL_KINDS.items()})


@lru_cache(maxsize=4)
def extractor_for(kind: FeatureKind, max_features: int, min_side: int) -> FeatureExtractor:
    """One extractor per process and setting (OpenCV's detector is built once)."""
    return FeatureExtractor(kind, max_features, min_side)


def prepare_image(data: bytes, spec: PrepareSpec) -> PreparedImage:
    """Raises BadInput for bytes that are not an allowed, decodable image."""
    began = time.perf_counter()
    decoded = decode_image(data, spec.decode, spec.input_size, spec.detail_side, pdq=True)
    assert decoded.pdq_view is not None
    pdq, quality = pdq_hex(decoded.pdq_view)
    phash = phash_hex(decoded.pixels)
    decode_ms = elapsed_ms(began)
    features = None
    began = time.perf_counter()
    if decoded.detail is not None:
        features = extractor_for(spec.feature_kind, spec.max_features, spec.min_side).extract(decoded.detail)
    return PreparedImage(
        sha256=sha256_hex(data),
        md5=md5_hex(data),
        phash=phash,
        pdq=pdq if quality >= spec.pdq_min_quality else "",
        pixels=np.ascontiguousarray(decoded.pixels, dtype=np.uint8),
        detail=decoded.detail,
        format=decoded.format,
        features=features,
        decode_ms=decode_ms,
        features_ms=elapsed_ms(began) if features is not None else 0.0,
    )
