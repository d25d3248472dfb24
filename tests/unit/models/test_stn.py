"""The spatial-transformer embedder: identity at initialisation, bounded warps, unit embeddings, the ablation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from services.common.models.mobilenet_v2 import MobileNetV2Features
from services.common.models.stn import STNEmbedder, theta_regulariser
from services.trainer.export import export_torchscript, load_torchscript

IDENTITY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def _model(use_stn: bool = True, input_size: int = 64, embed_dim: int = 32) -> STNEmbedder:
    torch.manual_seed(0)
    return STNEmbedder(MobileNetV2Features(), embed_dim=embed_dim, input_size=input_size, use_stn=use_stn).eval()


def _images(n: int = 3, side: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=generator)


def test_theta_starts_exactly_at_the_identity_and_the_warp_is_the_identity() -> None:
    model = _model()
    x = model.normalise(_images())
    theta = model.predict_theta(x)
    assert torch.equal(theta, IDENTITY.expand(3, 2, 3))
    warped = model.warp(x, theta, x.shape[-1])
    assert torch.allclose(warped, x, atol=1e-5)
    _, aligned = model.align(_images())
    assert (aligned.int() - _images().int()).abs().max() <= 1  # only uint8 rounding


def test_theta_stays_within_its_bounds_however_large_the_raw_output() -> None:
    model = _model()
    params = torch.randn(256, 5) * 100.0
    theta = model.theta_from_params(params)
    sx = theta[:, :, 0].norm(dim=1)  # column norms recover the per-axis scales
    sy = theta[:, :, 1].norm(dim=1)
    angle = torch.atan2(theta[:, 1, 0], theta[:, 0, 0])
    assert (angle.abs() <= math.radians(35.0) + 1e-5).all()
    scale = (sx * sy).sqrt()
    assert (scale >= 0.5 - 1e-5).all() and (scale <= 1.5 + 1e-5).all()
    aspect = (sx / sy).sqrt()
    assert (aspect <= 1.25 + 1e-5).all() and (aspect >= 1 / 1.25 - 1e-5).all()
    assert (theta[:, :, 2].abs() <= 0.5 + 1e-6).all()
    assert theta_regulariser(IDENTITY.expand(4, 2, 3)).item() == 0.0
    assert theta_regulariser(theta).item() > 0.0


def test_embeddings_are_unit_length_and_at_most_256_dimensions() -> None:
    model = _model(embed_dim=32)
    with torch.inference_mode():
        embedding, logits, theta = model.encode(_images())
    assert embedding.shape == (3, 32)
    assert torch.allclose(embedding.norm(dim=1), torch.ones(3), atol=1e-5)
    assert logits.shape == (3, len(model.categories))
    assert theta.shape == (3, 2, 3)
    with pytest.raises(ValueError):
        STNEmbedder(MobileNetV2Features(), embed_dim=512)


def test_the_ablation_has_the_same_parameters_and_never_warps() -> None:
    stn, plain = _model(use_stn=True), _model(use_stn=False)
    assert stn.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(stn.state_dict())
    images = _images()
    with torch.inference_mode():
        assert torch.allclose(stn(images), plain(images), atol=1e-6)  # identical while θ is the identity
        torch.nn.init.normal_(stn.loc.out.bias, std=1.0)
        plain.load_state_dict(stn.state_dict())
        assert not torch.equal(stn.predict_theta(stn.normalise(images)), IDENTITY.expand(3, 2, 3))
        assert torch.equal(plain.predict_theta(plain.normalise(images)), IDENTITY.expand(3, 2, 3))


def test_torchscript_export_keeps_forward_align_and_flags(tmp_path: Path) -> None:
    model = _model()
    path = export_torchscript(model, tmp_path / "model.pt", {"note": "test"})
    scripted, meta = load_torchscript(path)
    assert meta["embed_dim"] == 32 and meta["use_stn"] is True and meta["note"] == "test"
    images = _images()
    with torch.inference_mode():
        assert torch.allclose(scripted(images), model(images), atol=2e-3)  # fp16-rounded weights
        theta, warped = scripted.align(images)
        assert theta.shape == (3, 2, 3)
        assert warped.dtype == torch.uint8 and warped.shape == images.shape
        assert scripted.flags(images).shape == (3, len(model.categories))
    assert next(iter(model.parameters())).dtype == torch.float32  # exporting does not touch the caller's model


def test_the_onnx_friendly_gem_pools_exactly_like_gem() -> None:
    from services.common.models.gem import GeM
    from services.common.models.stn import GlobalGeM

    x = torch.rand(2, 8, 5, 7) * 6
    assert torch.allclose(GlobalGeM()(x), GeM()(x), atol=1e-6)
