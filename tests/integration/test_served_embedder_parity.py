"""The embedder version served by a real Triton equals the same files run in-process.

The session's Triton serves the latest version in model_repo/ (an STN-CNN). This is what makes ``sieve embed``
and ``sieve eval`` trustworthy stand-ins for the served model: whether they reach Triton or fall back to the
files, the embeddings agree, and the configured threshold is the one the version's card records.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import skimage
import torch
from PIL import Image

from services.common.config import REPO_ROOT, DecodeSettings, Settings
from services.common.imaging import decode_image
from services.common.inference import TritonModels
from services.common.transforms import NEAR_DUPLICATES, encode_jpeg
from services.evaluation.embed import ServedEmbedder, embed_folder, load_version, version_dir
from services.trainer.promotion import ModelRepository

DATA = Path(skimage.__file__).parent / "data"
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
SERVED = ModelRepository(REPO_ROOT / "model_repo").serving()
TAG = f"sieve_embedder:{SERVED}"


@pytest.fixture()
def served_repo(settings: Settings) -> tuple[Path, str]:
    """(repository, gRPC url) of the session's Triton, which serves model_repo/'s latest version."""
    assert SERVED >= 2 and version_dir(SERVED) == REPO_ROOT / "model_repo" / "sieve_embedder" / str(SERVED)
    return REPO_ROOT / "model_repo", settings.triton.url


def _settings(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"triton": settings.triton.model_copy(update={"url": url})})


def _photo(name: str) -> Image.Image:
    return Image.open(sorted(DATA.glob(f"{name}.*"))[0]).convert("RGB")


def _batch() -> np.ndarray:
    return np.stack([decode_image(encode_jpeg(_photo(n)), DecodeSettings(), 256).pixels for n in PHOTOS])


def test_triton_serves_the_latest_version_and_it_equals_the_in_process_torchscript(
    settings: Settings, served_repo: tuple[Path, str]
) -> None:
    repo, url = served_repo
    batch = _batch()
    result = TritonModels(_settings(settings, url).triton).infer(batch)
    assert result.model_version == TAG
    assert result.embeddings.shape == (len(PHOTOS), 256)
    assert np.allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-4)
    torch.set_num_threads(2)
    local = load_version(SERVED, repo / "sieve_embedder")  # the TorchScript original of the served ONNX
    with torch.inference_mode():
        expected = local(torch.from_numpy(batch)).float().numpy()
    assert np.allclose(result.embeddings, expected, atol=1e-4)
    assert (np.sum(result.embeddings * expected, axis=1) > 0.99999).all()


def test_sieve_embed_gives_the_same_file_through_triton_and_in_process(
    settings: Settings, served_repo: tuple[Path, str], tmp_path: Path
) -> None:
    repo, url = served_repo
    folder = tmp_path / "images"
    folder.mkdir()
    for name in PHOTOS:
        (folder / f"{name}.jpg").write_bytes(encode_jpeg(_photo(name)))
    served = ServedEmbedder.connect(_settings(settings, url))
    assert served.backend == "triton" and served.model_version == TAG
    local = ServedEmbedder.in_process(repo / "sieve_embedder")
    assert local.model_version == served.model_version
    embed_folder(folder, tmp_path / "triton.npz", served)
    embed_folder(folder, tmp_path / "local.npz", local)
    a, b = np.load(tmp_path / "triton.npz"), np.load(tmp_path / "local.npz")
    assert list(a["ids"]) == list(b["ids"]) == sorted(f"{n}.jpg" for n in PHOTOS)
    assert str(a["model_version"]) == TAG and str(a["backend"]) == "triton"
    assert np.allclose(a["embeddings"], b["embeddings"], atol=1e-5)


def test_a_near_duplicate_clears_the_served_threshold_and_an_unrelated_photo_does_not(
    settings: Settings, served_repo: tuple[Path, str]
) -> None:
    repo, url = served_repo
    threshold = settings.decision.version_thresholds[TAG]
    card = json.loads((repo / "sieve_embedder" / str(SERVED) / "model_card.json").read_text())
    assert abs(card["duplicate_threshold"] - threshold) < 1e-6  # config agrees with the card
    cat, rocket = _photo("chelsea"), _photo("rocket")
    pixels = [cat, NEAR_DUPLICATES["crop80"](cat), rocket]
    batch = np.stack([decode_image(encode_jpeg(p), DecodeSettings(), 256).pixels for p in pixels])
    emb = TritonModels(_settings(settings, url).triton).infer(batch).embeddings
    assert emb[0] @ emb[1] > threshold
    assert emb[0] @ emb[2] < threshold
