"""Inference ahead: a batch is embedded while the previous one is decided, and never embedded twice.

Real Redis (the exact-match store, the index, the keypoint store) and the real Triton, behind a spy that counts
which items reached it and when.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from numpy.typing import NDArray
from PIL import Image

from bench.hash_banks import LocalMessage
from services.common.config import Settings
from services.common.inference import InferenceResult, TritonModels
from services.common.uploads import event_for_file
from services.moderator.pipeline import Item, Pipeline

pytestmark = pytest.mark.integration


class _CountingTriton:
    """The session's real Triton behind a spy that records each call's batch size. ``down`` sends the next call
    to a port nothing listens on (a real connection failure); ``version`` relabels answers as another version,
    as a promotion between two batches would."""

    def __init__(self, settings: Settings) -> None:
        self.triton = TritonModels(settings.triton)
        self.unreachable = TritonModels(settings.triton.model_copy(update={"url": "127.0.0.1:1", "timeout_s": 5.0}))
        self.calls: list[int] = []
        self.down = 0
        self.version: str | None = None

    def infer(self, images: NDArray[Any]) -> InferenceResult:
        if self.down:
            self.down -= 1
            return self.unreachable.infer(images)  # raises TransientError
        result = self.triton.infer(images)
        self.calls.append(len(images))
        return replace(result, model_version=self.version) if self.version else result


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
    models = _CountingTriton(settings)
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
    served = out.verdicts[0][0].model_version
    assert served.startswith("sieve_embedder:") and all(
        v.model_version == served and "infer_ms" in v.timings for v, _ in out.verdicts
    )


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
    assert out["other"].model_version.startswith("sieve_embedder:")


def test_a_failure_ahead_is_inferred_in_line(pipeline_and_models: Any, tmp_path: Path) -> None:
    pipeline, models = pipeline_and_models
    items = _items(pipeline, [("u", _photo(tmp_path / "u.png", (10, 120, 240), 3))])
    models.down = 1
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
    pipeline.infer_ahead(items[:1])  # the first answered by the served version ahead ...
    served = items[0].inferred.result.model_version if items[0].inferred else ""
    models.version = served + "-promoted"  # ... then a promotion: the rest is answered by the next one in line
    out = {v.upload_id: v for v, _ in pipeline.run(items).verdicts}
    assert out["old"].model_version == served and out["new"].model_version == served + "-promoted"
    assert out["new"].duplicate_of == []  # the copy's twin lives in another embedding space
    assert set(pipeline.indexes) == {served, served + "-promoted"}
