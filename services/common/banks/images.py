"""The signals of an image to bank: the same hashes the moderator computes for an upload, under one item id."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from services.common.banks.signals import Signal, image_signals_of
from services.common.config import Settings
from services.common.prepared import PreparedImage, PrepareSpec, prepare_image
from services.common.verification import LocalFeatures


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


def _signals(prepared: PreparedImage, item_id: str) -> list[Signal]:
    return image_signals_of(prepared, item_id or prepared.sha256[:16])


def image_signals(data: bytes, settings: Settings, item_id: str = "") -> list[Signal]:
    """sha256, md5, the 64-bit pHash (when informative) and PDQ (when its quality is enough to match on)."""
    return _signals(prepare_image(data, PrepareSpec.of(settings, keypoints=False)), item_id)


def banked_image(data: bytes, settings: Settings, item_id: str = "") -> BankedImage:
    """Everything banking an image needs, from the moderator's own ``prepare_image``: the same decode, hashes
    and keypoints an upload of it gets."""
    prepared = prepare_image(data, PrepareSpec.of(settings))
    return BankedImage(_signals(prepared, item_id), prepared.pixels, prepared.features)
