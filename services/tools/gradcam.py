"""The parts of ``sieve explain`` that need the network in torch (the train extra): the served network cut at its
last feature map for Grad-CAM of the cosine similarity, and the spatial transformer's warp."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from services.evaluation.embed import load_version
from services.tools.pair_evidence import PairEvidence

WIRE_SIZE = 256  # what the moderator sends to Triton: uint8 NHWC 256x256
Tensor = torch.Tensor


@dataclass
class Anatomy:
    """The served network cut at its last convolutional feature map, where Grad-CAM reads gradients.

    Works for the eager modules and for the TorchScript export alike: it only calls submodules and methods
    that the export keeps (``normalise``, ``predict_theta``, ``warp``, ``features``, ``pool``, ``reduce``,
    ``align``, ``flags``), so no second copy of the weights and no second model loader is needed.
    """

    name: str
    stn: bool
    stn_note: str
    prepare: Callable[[Tensor], tuple[Tensor, Tensor | None]]  # uint8 NHWC -> (backbone input, θ or None)
    features: Callable[[Tensor], Tensor]
    head: Callable[[Tensor], Tensor]  # feature map -> L2-normalised embedding
    network: Callable[[Tensor], Tensor]  # the whole served forward, for the parity check
    align: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    flags: Callable[[Tensor], Tensor] | None = None
    categories: list[str] = field(default_factory=list)

    def embed(self, images: Tensor) -> Tensor:
        """Embedding through the cut pieces; equals ``network(images)`` (the tests hold it to that)."""
        x, _ = self.prepare(images)
        return self.head(self.features(x))


def dissect(network: Any, name: str) -> Anatomy:
    """Split v1 (GeM baseline) or v2+ (STN, eager or TorchScript) into prepare / features / head."""
    from services.common.models.gem import GeMEmbedder

    if isinstance(network, GeMEmbedder):
        gem: GeMEmbedder = network
        size = gem.normalize.size
        return Anatomy(
            name=name,
            stn=False,
            stn_note=f"{name} has no spatial transformer: the backbone sees the whole image resized to {size} px, "
            "so there is no warped view to show.",
            prepare=lambda images: (gem.normalize(images), None),
            features=gem.trunk.features,
            head=lambda fmap: F.normalize(gem.pool(fmap), dim=1),
            network=gem,
        )
    if all(hasattr(network, attr) for attr in ("align", "predict_theta", "warp", "features", "reduce", "pool")):
        size = int(network.input_size)
        learned = bool(network.use_stn)

        def prepare(images: Tensor) -> tuple[Tensor, Tensor | None]:
            x = network.normalise(images)
            theta = network.predict_theta(x)
            return network.warp(x, theta, size), theta

        def head(fmap: Tensor) -> Tensor:
            return F.normalize(network.reduce(network.pool(fmap)), dim=1)

        note = "" if learned else f"{name} was built with use_stn=False (the ablation): its θ is the fixed identity."
        return Anatomy(
            name=name,
            stn=True,
            stn_note=note,
            prepare=prepare,
            features=network.features,
            head=head,
            network=network,
            align=network.align,
            flags=network.flags,
            categories=[str(c) for c in network.categories],
        )
    raise TypeError(f"{name}: unknown embedder type {type(network).__name__}; explain cannot cut it for Grad-CAM")


# -------------------------------------------------------------------------------------------------- evidence


def pair_evidence(anatomy: Anatomy, pixels: NDArray[np.uint8]) -> PairEvidence:
    """Grad-CAM of cos(emb_a, emb_b) w.r.t. each image's last feature map, plus the STN view when there is one.

    Only the head needs gradients (the feature maps are leaves), so this costs one forward pass and a tiny
    backward; both images go through in one batch (eval-mode BatchNorm keeps them independent).
    """
    images = torch.from_numpy(np.ascontiguousarray(pixels))
    with torch.no_grad():
        x, theta = anatomy.prepare(images)
        fmap = anatomy.features(x)
    with torch.enable_grad():
        leaf = fmap.detach().clone().requires_grad_(True)
        emb = anatomy.head(leaf)
        sim = (emb[0] * emb[1]).sum()
        (grad,) = torch.autograd.grad(sim, leaf)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # one weight per channel: the Grad-CAM recipe
    cam = F.relu((weights * leaf.detach()).sum(dim=1, keepdim=True))
    peak = cam.amax(dim=(1, 2, 3))
    size = int(x.shape[-1])
    view = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
    view = view / peak.clamp_min(1e-12).view(-1, 1, 1, 1)
    if theta is not None:
        # The warp samples input point θ·p for output point p, so the heat at input point q is heat(θ⁻¹·q).
        bottom = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=theta.dtype).expand(theta.shape[0], 1, 3)
        inverse = torch.linalg.inv(torch.cat([theta, bottom], dim=1))[:, :2, :]
        grid = F.affine_grid(inverse, [theta.shape[0], 1, WIRE_SIZE, WIRE_SIZE], align_corners=False)
        on_input = F.grid_sample(view, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    else:
        on_input = F.interpolate(view, size=(WIRE_SIZE, WIRE_SIZE), mode="bilinear", align_corners=False)
    warped: NDArray[np.uint8] | None = None
    stn_flags: list[dict[str, float]] | None = None
    with torch.no_grad():
        if anatomy.align is not None:
            _, aligned = anatomy.align(images)
            warped = aligned.numpy().astype(np.uint8)
        if anatomy.flags is not None and anatomy.categories:
            probs = anatomy.flags(images).numpy()
            stn_flags = [{c: round(float(p), 4) for c, p in zip(anatomy.categories, row, strict=True)} for row in probs]
    return PairEvidence(
        similarity=float(sim.detach()),
        stn=anatomy.stn,
        stn_note=anatomy.stn_note,
        heat_view=view[:, 0].numpy().astype(np.float32),
        heat_input=on_input[:, 0].clamp(0.0, 1.0).numpy().astype(np.float32),
        heat_peak=[float(p) for p in peak],
        theta=None if theta is None else theta.detach().numpy().astype(np.float32),
        warped=warped,
        stn_flags=stn_flags,
    )


@functools.lru_cache(maxsize=2)
def anatomy_of(version: int, repo: Path, local_name: str) -> Anatomy:
    """Loaded once per version: the reviewer service explains many pairs with the same network."""
    return dissect(load_version(version, repo), local_name)


def aligned_view(anatomy: Anatomy, pixels: NDArray[np.uint8]) -> NDArray[np.uint8] | None:
    """The STN's canonical pose of one decoded image; None without a spatial transformer."""
    if anatomy.align is None:
        return None
    with torch.no_grad():
        _, aligned = anatomy.align(torch.from_numpy(pixels[None].copy()))
    view: NDArray[np.uint8] = aligned[0].numpy().astype(np.uint8)
    return view
