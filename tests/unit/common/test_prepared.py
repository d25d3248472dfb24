"""``prepare_image``: the one decode the moderator and the banks share, at reduced size (JPEG draft mode).

Banks hold hashes and keypoints computed from earlier decodes: the reduced decode must stay within what matching
tolerates of a full-size decode, and a worker process must hand back exactly what an in-process call computes.
"""

import io

import numpy as np
import pytest
import skimage
from PIL import Image

from services.common.banks.signals import pdq_hex
from services.common.config import Settings
from services.common.hashing import phash_hex
from services.common.imaging import detail_view
from services.common.prepared import PrepareSpec, prepare_image
from services.common.verification import FeatureExtractor, count_inliers
from services.moderator.stages.workers import Workers


def _bits(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def _jpeg(picture: np.ndarray, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture).resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [_jpeg(skimage.data.astronaut(), (2400, 2400)), _jpeg(skimage.data.coffee(), (2400, 1600))],
    ids=["astronaut", "coffee"],
)
def test_reduced_decode_stays_within_tolerance_of_a_full_size_decode(data: bytes) -> None:
    spec = PrepareSpec.of(Settings())
    prepared = prepare_image(data, spec)
    full = Image.open(io.BytesIO(data))
    full.load()  # no draft: every pixel, then reduced
    full = full.convert("RGB")
    pixels = np.asarray(full.resize((spec.input_size,) * 2, Image.Resampling.BILINEAR, reducing_gap=2.0))
    assert np.abs(pixels.astype(int) - prepared.pixels.astype(int)).mean() < 2.0  # of 255
    assert _bits(phash_hex(pixels), prepared.phash) <= 4  # of 64
    assert _bits(pdq_hex(detail_view(full, 512))[0], prepared.pdq) <= 16  # of 256; banks match at <= 31
    reference = FeatureExtractor(spec.feature_kind, spec.max_features).extract(detail_view(full, spec.detail_side))
    assert prepared.features is not None
    assert count_inliers(prepared.features, reference, 0.8, 5.0) >= 0.6 * len(reference)


def test_a_worker_process_returns_what_an_in_process_call_computes() -> None:
    data = _jpeg(skimage.data.chelsea(), (900, 600))
    spec = PrepareSpec.of(Settings())
    here = prepare_image(data, spec)
    workers = Workers(1)
    try:
        there = workers.call(prepare_image, data, spec)
    finally:
        workers.close()
    assert (there.sha256, there.md5, there.phash, there.pdq, there.format) == (
        here.sha256,
        here.md5,
        here.phash,
        here.pdq,
        here.format,
    )
    assert np.array_equal(there.pixels, here.pixels)
    assert here.features is not None and there.features is not None
    assert np.array_equal(there.features.descriptors, here.features.descriptors)
    assert there.signals() == here.signals()
