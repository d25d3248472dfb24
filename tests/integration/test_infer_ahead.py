"""Inference ahead: a batch is embedded while the previous one is decided, and never embedded twice.

Real Redis (the exact-match store, the index, the keypoint store); the models are a counting stand-in for
``ImageModels`` so the test can see which items reached them and when.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from numpy.typing import NDArray
from PIL import Image

from bench.hash_banks import LocalMessage
from services.common.config import Settings
from services.common.errors import TransientError
from services.common.inference import InferenceResult
from services.common.uploads import event_for_file
from services.moderator.pipeline import Item, Pipeline

pytestmark = pytest.mark.integration


@dataclass
class _CountingModels:
    """Embeds an image as its mean colour (so copies are near, different photos far); records each call."""

    version: str = "stub:1"
    fail_next: int = 0
    calls: list[int] = field(default_factory=list)

    def infer(self, images: NDArray[Any]) -> InferenceResult:
        if self.fail_next:
            self.fail_next -= 1
            raise TransientError("triton", "unavailable")
        self.calls.append(len(images))
        flat = images.reshape(len(images), -1, 3).astype(np.float32).mean(axis=1)
        emb = np.concatenate([flat - flat.mean(axis=1, keepdims=True), np.ones((len(images), 1))], axis=1)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        scores = np.zeros((len(images), 1), np.float32)
        return InferenceResult(emb.astype(np.float32), scores, ["nsfw"], self.version)


def _photo(path: Path, colour: tuple[int, int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(colour, 40, (96, 128, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


def _items(pipeline: Pipeline, uploads: list[tuple[str, Path]]) -> list[Item]:
    messages = [LocalMessage(event_for_file(p, u).model_dump_json().encode(), n) for n, (u, p) in enumerate(uploads)]
    return pipeline.start_items(messages)  # type: ignore[arg-type]


@pytest.fixture()
def pipeline_and_models(settings: Settings) -> Any:
    models = _CountingModels()
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    pipeline = Pipeline(settings, models, client)
    yield pipeline, models
    pipeline.close()


def test_a_batch_inferred_ahead_is_not_inferred_again(pipeline_and_models: Any, tmp_path: Path) -> None:
    pipeline, models = pipeline_and_models
    photos = [_photo(tmp_path / f"p{i}.png", c, i) for i, c in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)])]
    items = _items(pipeline, [(f"u{i}", p) for i, p in enumerate(photos)])
    pipeline.prepare(items)
    pipeline.infer_ahead(items)
    assert models.calls == [3]
    out = pipeline.run(items)
    assert models.calls == [3]  # run used the embeddings from ahead
    assert sorted(v.upload_id for v, _ in out.verdicts) == ["u0", "u1", "u2"]
    assert all(v.model_version == "stub:1" and "infer_ms" in v.timings for v, _ in out.verdicts)


def test_exact_reuploads_are_left_out_of_inference_ahead(pipeline_and_models: Any, tmp_path: Path) -> None:
    pipeline, models = pipeline_and_models
    first, other = _photo(tmp_path / "a.png", (90, 90, 200), 1), _photo(tmp_path / "b.png", (200, 200, 20), 2)
    earlier = _items(pipeline, [("first", first)])
    pipeline.commit_index(pipeline.run(earlier))
    later = _items(pipeline, [("again", first), ("other", other)])
    pipeline.prepare(later)
    pipeline.infer_ahead(later)
    assert models.calls == [1, 1]  # "first", then only "other": "again" is an exact re-upload
    out = {v.upload_id: v for v, _ in pipeline.run(later).verdicts}
    assert models.calls == [1, 1]
    assert out["again"].reasons == ["exact_hash_match:sha256:first"]
    assert out["other"].model_version == "stub:1"


def test_a_failure_ahead_is_inferred_in_line(pipeline_and_models: Any, tmp_path: Path) -> None:
    pipeline, models = pipeline_and_models
    items = _items(pipeline, [("u", _photo(tmp_path / "u.png", (10, 120, 240), 3))])
    models.fail_next = 1
    pipeline.prepare(items)
    pipeline.infer_ahead(items)  # Triton down: logged, nothing raised, nothing inferred
    assert models.calls == [] and items[0].inferred is None
    out = pipeline.run(items)
    assert models.calls == [1]
    assert [v.upload_id for v, _ in out.verdicts] == ["u"]


def test_items_answered_by_two_model_versions_are_decided_in_their_own_indexes(
    pipeline_and_models: Any, tmp_path: Path
) -> None:
    pipeline, models = pipeline_and_models
    photo = _photo(tmp_path / "x.png", (128, 64, 32), 4)
    copy = tmp_path / "x-copy.jpg"
    Image.open(photo).convert("RGB").save(copy, "JPEG", quality=80)
    items = _items(pipeline, [("old", photo), ("new", copy)])
    pipeline.prepare(items)
    pipeline.infer_ahead(items[:1])  # the first answered by stub:1 ahead ...
    models.version = "stub:2"  # ... then a promotion: the rest is answered by stub:2 in line
    out = {v.upload_id: v for v, _ in pipeline.run(items).verdicts}
    assert out["old"].model_version == "stub:1" and out["new"].model_version == "stub:2"
    assert out["new"].duplicate_of == []  # the copy's twin lives in another embedding space
    assert set(pipeline.indexes) == {"stub:1", "stub:2"}
