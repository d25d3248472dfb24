"""The served models, called over gRPC on the real Triton server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage
import torch
from PIL import Image

from services.common.config import DecodeSettings, Settings
from services.common.imaging import decode_image
from services.common.inference import TritonModels
from services.common.transforms import NEAR_DUPLICATES, encode_jpeg
from services.evaluation.embed import latest_version, load_version

DATA = Path(skimage.__file__).parent / "data"


def _pixels(img: Image.Image) -> np.ndarray:
    return decode_image(encode_jpeg(img), DecodeSettings(), 256).pixels


def test_embeddings_are_normalised_and_match_the_in_process_model(settings: Settings) -> None:
    photos = [Image.open(DATA / f"{n}.png").convert("RGB") for n in ("chelsea", "coffee", "astronaut")]
    batch = np.stack([_pixels(p) for p in photos])
    result = TritonModels(settings.triton).infer(batch)
    version = latest_version()
    assert result.model_version == f"sieve_embedder:{version}"
    assert result.embeddings.shape[0] == 3 and result.embeddings.shape[1] in (256, 1280)
    assert np.allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-4)
    local = load_version(version)  # exactly what the version folder serves, run in-process
    with torch.inference_mode():
        expected = local(torch.from_numpy(batch)).float().numpy()
    assert np.allclose(result.embeddings, expected, atol=1e-4)
    assert result.categories == ["nsfw"]
    assert result.scores.shape == (3, 1) and ((result.scores >= 0) & (result.scores <= 1)).all()


def test_near_duplicate_is_closer_than_an_unrelated_photo(settings: Settings) -> None:
    cat = Image.open(DATA / "chelsea.png").convert("RGB")
    rocket = Image.open(DATA / "rocket.jpg").convert("RGB")
    batch = np.stack([_pixels(cat), _pixels(NEAR_DUPLICATES["crop80"](cat)), _pixels(rocket)])
    emb = TritonModels(settings.triton).infer(batch).embeddings
    threshold = settings.decision.version_thresholds[f"sieve_embedder:{latest_version()}"]
    assert emb[0] @ emb[1] > threshold
    assert emb[0] @ emb[2] < threshold


def test_shared_memory_transport_gives_identical_outputs(settings: Settings) -> None:
    photos = [Image.open(DATA / f"{n}.png").convert("RGB") for n in ("chelsea", "coffee")]
    batch = np.stack([_pixels(p) for p in photos])
    plain = TritonModels(settings.triton).infer(batch)
    shm_models = TritonModels(settings.triton.model_copy(update={"shared_memory": True}))
    try:
        via_shm = shm_models.infer(batch)
        again = shm_models.infer(batch[::-1].copy())  # the region is reused across batches
    finally:
        shm_models.close()
    assert np.array_equal(plain.embeddings, via_shm.embeddings)
    assert np.array_equal(plain.scores, via_shm.scores)
    assert np.allclose(again.embeddings, plain.embeddings[::-1], atol=1e-6)
