"""Spatial-Transformer embedder (version 2): warp to a canonical pose, then MobileNetV2, GeM and two heads.

The localisation network sees a small copy of the image and predicts a bounded similarity-plus-aspect
transform. Its last layer starts at zero, so a fresh model warps with the exact identity and behaves like
the plain CNN until training teaches it otherwise. ``use_stn=False`` builds the ablation the papers report:
the same sampler with a fixed identity θ, so the only difference between the two models is the learned warp.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from services.common.models.gem import GeM
from services.common.models.mobilenet_v2 import (
    FEATURE_DIM,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MobileNetV2Features,
    load_imagenet_trunk,
)

# Flags the classifier head is first trained on: facts the augmentation pipeline knows exactly, and that
# moderation cares about (memes, screenshots, framed reposts). Reviewer labels can extend the list later.
DEFAULT_CATEGORIES: tuple[str, ...] = ("text_overlay", "emoji_overlay", "screenshot", "border", "grayscale")


class GlobalGeM(GeM):
    """GeM over the whole map via adaptive pooling: the same numbers as ``GeM``, but with no kernel size
    computed from the input, so the network also exports to ONNX."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p).flatten(1)


class Localisation(nn.Module):
    """A few strided convolutions on a 64 px thumbnail: the pose needs layout, not detail, so it stays cheap."""

    def __init__(self, thumb: int = 64, n_params: int = 5) -> None:
        super().__init__()
        self.thumb = thumb
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 5, 2, 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, 2, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, 2, 1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 64),
            nn.ReLU(inplace=True),
        )
        self.out = nn.Linear(64, n_params)
        # Zero weights and bias: tanh(0) = 0 everywhere below, so θ is exactly the identity at initialisation.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = F.adaptive_avg_pool2d(x, (self.thumb, self.thumb))
        out: torch.Tensor = self.out(self.body(small))
        return out


class STNEmbedder(nn.Module):
    """uint8 NHWC in (as sent over the wire), L2-normalised embedding out; θ and flags on request."""

    def __init__(
        self,
        trunk: MobileNetV2Features,
        embed_dim: int = 256,
        input_size: int = 176,
        use_stn: bool = True,
        categories: tuple[str, ...] = DEFAULT_CATEGORIES,
        max_rotation_deg: float = 35.0,
        scale_range: float = 0.5,
        max_aspect: float = 1.25,
        max_shift: float = 0.5,
    ) -> None:
        super().__init__()
        if embed_dim > 256:
            raise ValueError("the index budget allows at most 256 dimensions")
        self.input_size = input_size
        self.use_stn = use_stn
        self.embed_dim = embed_dim
        self.categories = list(categories)
        self.max_rotation = math.radians(max_rotation_deg)
        self.scale_range = scale_range
        self.log_aspect = math.log(max_aspect)
        self.max_shift = max_shift
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)
        self.loc = Localisation()
        # The ImageNet classifier is dead weight here: dropping it keeps the shipped file a few MB.
        self.features = trunk.features
        self.pool = GlobalGeM()
        # "Expand then reduce": the trunk's last 1x1 conv expands 320 -> 1280 channels, GeM pools them,
        # and a linear projection reduces to the index dimension (1280 -> 256 costs 5x less index memory).
        self.reduce = nn.Linear(FEATURE_DIM, embed_dim)
        self.classifier = nn.Linear(FEATURE_DIM, len(categories))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    def theta_from_params(self, params: torch.Tensor) -> torch.Tensor:
        """Bounded parameters -> 2x3 affine: rotation, isotropic scale, aspect and shift, each through tanh."""
        t = torch.tanh(params)
        angle = t[:, 0] * self.max_rotation
        scale = 1.0 + t[:, 1] * self.scale_range
        aspect = torch.exp(t[:, 2] * self.log_aspect)
        sx = scale * aspect
        sy = scale / aspect
        cos, sin = torch.cos(angle), torch.sin(angle)
        tx, ty = t[:, 3] * self.max_shift, t[:, 4] * self.max_shift
        row0 = torch.stack([sx * cos, -sy * sin, tx], dim=1)
        row1 = torch.stack([sx * sin, sy * cos, ty], dim=1)
        return torch.stack([row0, row1], dim=1)

    def predict_theta(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if not self.use_stn:
            eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=x.dtype, device=x.device)
            return eye.unsqueeze(0).expand(n, 2, 3)
        return self.theta_from_params(self.loc(x))

    def warp(self, x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
        """Grid sampling also does the resize to the trunk's input size, so the warp costs one pass."""
        grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embedding, classifier logits, θ) in one pass: training uses all three."""
        x = self.normalise(images)
        theta = self.predict_theta(x)
        warped = self.warp(x, theta, self.input_size)
        pooled = self.pool(self.features(warped))
        embedding = F.normalize(self.reduce(pooled), dim=1)
        logits = self.classifier(pooled)
        return embedding, logits, theta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)[0]

    @torch.jit.export
    def flags(self, images: torch.Tensor) -> torch.Tensor:
        """Per-category probabilities of the multi-label head."""
        return torch.sigmoid(self.encode(images)[1])

    @torch.jit.export
    def align(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """θ and the warped image as uint8 NHWC at the input resolution: the reviewers' "aligned view"."""
        x = self.normalise(images)
        theta = self.predict_theta(x)
        warped = self.warp(x, theta, int(images.shape[1])) * self.std + self.mean
        return theta, warped.clamp(0.0, 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def theta_regulariser(theta: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of θ from the identity: keeps warps plausible when the contrastive signal is weak."""
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=theta.dtype, device=theta.device)
    return (theta - eye).pow(2).sum(dim=(1, 2)).mean()


def build_stn_embedder(use_stn: bool = True, embed_dim: int = 256, input_size: int = 176) -> STNEmbedder:
    """ImageNet-initialised trunk; the heads start fresh (the projection as a scaled random init)."""
    return STNEmbedder(load_imagenet_trunk(), embed_dim=embed_dim, input_size=input_size, use_stn=use_stn)
