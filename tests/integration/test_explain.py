"""``sieve explain`` on real photos: the served version in-process (v1 today) and a v2-style TorchScript STN.

The STN case builds a throwaway model repository with a TorchScript export whose localisation layer is
nudged off the identity, so the warped view must differ from the input and the heat maps must be mapped
back through a real θ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.cli import main as sieve
from services.common.config import DecodeSettings
from services.common.imaging import decode_image
from services.common.photos.build import load_photo_set
from services.common.transforms import NEAR_DUPLICATES, encode_jpeg
from services.evaluation.embed import EMBEDDER_REPO, latest_version, load_version
from services.tools.explain import explain
from services.tools.gradcam import dissect, pair_evidence
from tests.thresholds import expected_threshold


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A held-out photo, its planted copy (crop + JPEG), and an unrelated held-out photo of another kind."""
    manifest = load_photo_set()
    held = sorted((r for r in manifest.split("heldout") if r.source == "gcompris"), key=lambda r: r.id)
    original = next(r for r in held if "categorization__images__tools" in r.file)
    other = next(r for r in held if "paintings" in r.file)
    folder = tmp_path_factory.mktemp("explain")
    copy = folder / "copy.jpg"
    copy.write_bytes(
        encode_jpeg(NEAR_DUPLICATES["crop90_jpeg50"](Image.open(manifest.path_of(original)).convert("RGB")))
    )
    return {"original": manifest.path_of(original), "copy": copy, "other": manifest.path_of(other)}


def _pixels(*paths: Path) -> np.ndarray:
    return np.stack([decode_image(p.read_bytes(), DecodeSettings(), 256).pixels for p in paths])


def test_planted_copy_scores_above_the_threshold_and_unrelated_below(photos: dict[str, Path], tmp_path: Path) -> None:
    served = f"sieve_embedder:{latest_version()}"
    threshold = expected_threshold(served)  # from the model card, not from the code under test
    out = tmp_path / "copy.png"
    match = explain(photos["original"], photos["copy"], out, prefer_triton=False)
    assert match.duplicate_threshold == pytest.approx(threshold)  # the threshold of the version that answered
    assert match.similarity >= threshold and match.verdict.startswith("duplicate")
    assert match.backend == "in-process" and match.model_version == f"sieve_embedder:{latest_version()}"
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.width >= 900 and picture.height >= 700
    assert all(s > 0.05 for s in match.heat_std), "a Grad-CAM map is (nearly) constant"
    assert all(p > 0 for p in match.heat_peak)
    assert set(match.scores[0]) == {"nsfw"} and all(0.0 <= s["nsfw"] <= 1.0 for s in match.scores)

    other = explain(photos["original"], photos["other"], tmp_path / "other.html", prefer_triton=False)
    assert other.similarity < threshold - other.review_margin and other.verdict == "no match"
    page = (tmp_path / "other.html").read_text()
    assert "data:image/jpeg;base64," in page and "no match" in page
    if not match.stn:
        # v1 has no spatial transformer: the picture and the JSON must say so instead of inventing a warp.
        assert match.pose is None and "no spatial transformer" in match.stn_note


def test_heat_maps_follow_the_evidence_not_a_constant(photos: dict[str, Path]) -> None:
    version = latest_version()
    anatomy = dissect(load_version(version), f"sieve_embedder:{version}")
    pixels = _pixels(photos["original"], photos["copy"])
    with torch.inference_mode():
        whole = anatomy.network(torch.from_numpy(pixels)).numpy()
        cut = anatomy.embed(torch.from_numpy(pixels)).numpy()
    assert np.allclose(whole, cut, atol=1e-5)  # Grad-CAM looks at exactly the served computation
    ev = pair_evidence(anatomy, pixels)
    assert ev.similarity == pytest.approx(float(whole[0] @ whole[1]), abs=1e-5)
    assert ev.heat_input is not None
    for heat in ev.heat_input:
        assert heat.max() == pytest.approx(1.0, abs=0.05) and heat.min() < 0.2 and heat.std() > 0.05


@pytest.fixture(scope="module")
def stn_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository whose newest version is a TorchScript STN embedder, exported as ``sieve train`` does."""
    from services.common.models.stn import build_stn_embedder
    from services.trainer.export import export_torchscript

    torch.manual_seed(0)
    model = build_stn_embedder(embed_dim=64, input_size=160).eval()
    with torch.no_grad():
        model.loc.out.bias.copy_(torch.tensor([0.5, -0.3, 0.0, 0.2, 0.0]))  # ~16° rotation, zoom in, shift
    repo = tmp_path_factory.mktemp("repo") / "sieve_embedder"
    for version in ("1", "2"):
        (repo / version).mkdir(parents=True)
        shutil.copy(EMBEDDER_REPO / "1" / "model.py", repo / version / "model.py")
    export_torchscript(model, repo / "2" / "model.pt", {"source": "test"})
    return repo


def test_stn_version_shows_the_warp_and_maps_heat_back(photos: dict[str, Path], stn_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "stn.png"
    result = explain(photos["original"], photos["copy"], out, prefer_triton=False, repo=stn_repo)
    assert result.model_version == "sieve_embedder:2" and result.stn and result.stn_note == ""
    assert result.pose is not None
    for pose in result.pose:
        assert abs(pose["rotation_deg"]) > 5 and pose["scale"] < 0.95
    assert result.stn_flags is not None and len(result.stn_flags[0]) == 5
    assert all(s > 0.02 for s in result.heat_std)

    anatomy = dissect(load_version(2, stn_repo), "sieve_embedder:2")
    pixels = _pixels(photos["original"], photos["copy"])
    ev = pair_evidence(anatomy, pixels)
    assert ev.warped is not None and ev.warped.shape == pixels.shape
    assert np.abs(ev.warped.astype(int) - pixels.astype(int)).mean() > 10  # a real warp, not a copy
    with torch.inference_mode():
        whole = anatomy.network(torch.from_numpy(pixels)).numpy()
    assert ev.similarity == pytest.approx(float(whole[0] @ whole[1]), abs=1e-5)
    # Heat outside the STN window cannot exist: the backbone never saw those pixels.
    assert ev.heat_input is not None
    corner = ev.heat_input[:, :6, :6]
    assert float(corner.max()) == 0.0
    assert Image.open(out).width > 1000  # four panels per row


def test_cli_explain_prints_json_and_writes_the_picture(
    photos: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.png"
    assert sieve(["explain", str(photos["original"]), str(photos["copy"]), "--out", str(out), "--no-triton"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and out.exists()
    assert printed["similarity"] >= printed["duplicate_threshold"]
