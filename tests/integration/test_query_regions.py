"""A photo pasted into a collage: the whole upload's embedding is far from its earlier upload while their keypoints
agree, so the moderator embeds the collage's regions (one more call to the real Triton) and links the two.

Real Redis (the index, the keypoint store) and the real Triton behind a spy that records each call's batch size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from numpy.typing import NDArray
from PIL import Image, ImageFilter
from skimage import data as skdata

from bench.hash_banks import LocalMessage
from services.common.config import Settings
from services.common.inference import InferenceResult, TritonModels
from services.common.regions import REGIONS
from services.common.schemas import Verdict
from services.common.transforms import encode_jpeg
from services.common.uploads import event_for_file
from services.moderator.pipeline import Pipeline

pytestmark = pytest.mark.integration


class _Spy:
    def __init__(self, settings: Settings) -> None:
        self.triton = TritonModels(settings.triton)
        self.calls: list[int] = []

    def infer(self, images: NDArray[Any]) -> InferenceResult:
        self.calls.append(len(images))
        return self.triton.infer(images)


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).convert("RGB")


def _collage(tmp_path: Path) -> tuple[Path, Path]:
    """Coffee, and a collage with it in the top-left quarter beside three softened photos."""
    coffee = _photo("coffee")
    collage = Image.new("RGB", (600, 600))
    for name, at in (("chelsea", (300, 0)), ("rocket", (0, 300)), ("camera", (300, 300))):
        collage.paste(_photo(name).resize((300, 300)).filter(ImageFilter.GaussianBlur(2)), at)
    collage.paste(coffee.resize((300, 300)), (0, 0))
    original, pasted = tmp_path / "coffee.jpg", tmp_path / "collage.jpg"
    original.write_bytes(encode_jpeg(coffee, 92))
    pasted.write_bytes(encode_jpeg(collage, 85))
    return original, pasted


def _verdict(pipeline: Pipeline, upload_id: str, path: Path, offset: int) -> Verdict:
    message = LocalMessage(event_for_file(path, upload_id).model_dump_json().encode(), offset)
    out = pipeline.run(pipeline.start_items([message]))  # type: ignore[list-item]
    pipeline.commit_index(out)
    [(verdict, span)] = out.verdicts
    span.end()
    return verdict


@pytest.mark.parametrize("query_regions", [True, False])
def test_a_photo_pasted_into_a_collage_is_linked_by_the_collages_regions(
    settings: Settings, tmp_path: Path, query_regions: bool
) -> None:
    prefix = f"{settings.redis.key_prefix}-regions-{query_regions}"
    settings = settings.model_copy(
        update={
            "redis": settings.redis.model_copy(update={"key_prefix": prefix}),
            "verify": settings.verify.model_copy(update={"query_regions": query_regions}),
        }
    )
    spy = _Spy(settings)
    pipeline = Pipeline(settings, spy, redis.Redis.from_url(settings.redis.url.get_secret_value()))
    try:
        original, pasted = _collage(tmp_path)
        assert _verdict(pipeline, "coffee", original, 0).duplicate_of == []
        verdict = _verdict(pipeline, "collage", pasted, 1)
    finally:
        pipeline.close()
    [evidence] = [e for e in verdict.evidence if e.upload_id == "coffee"]
    assert evidence.inliers > settings.verify.inlier_floor  # the geometry agrees either way
    if not query_regions:
        assert verdict.duplicate_of == [] and len(REGIONS) not in spy.calls
        assert evidence.score < settings.decision.threshold_for(verdict.model_version)
        return
    assert [d.upload_id for d in verdict.duplicate_of] == ["coffee"]
    assert "query_regions:coffee" in verdict.reasons
    assert spy.calls[-1] == len(REGIONS)  # the collage's regions, after its own embedding
    assert evidence.score >= settings.decision.threshold_for(verdict.model_version)
    whole = spy.triton.infer(np.stack([_pixels(original), _pixels(pasted)])).embeddings
    assert evidence.cosine > float(whole[0] @ whole[1]) + 0.3  # a region's cosine, not the whole collage's


def _pixels(path: Path) -> NDArray[np.uint8]:
    from services.common.prepared import PrepareSpec, prepare_image

    return prepare_image(path.read_bytes(), PrepareSpec.of(Settings())).pixels
