"""Generalised-mean pooling: a learnable p between average (p=1) and max pooling, standard for retrieval."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.common.models.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2Features


class GeM(nn.Module):
    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A mean over the spatial axes rather than avg_pool2d with the map's size: same numbers, and it exports
        # to ONNX (a kernel size read from the input shape does not).
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class ImageNormalizer(nn.Module):
    """Takes uint8 NHWC (as sent over the wire) to normalised float NCHW at the model's input size."""

    def __init__(self, size: int = 224) -> None:
        super().__init__()
        self.size = size
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        mean: torch.Tensor = self.mean
        std: torch.Tensor = self.std
        return (x - mean) / std


class GeMEmbedder(nn.Module):
    """Baseline embedder: ImageNet MobileNetV2 trunk, GeM pooling, L2 normalisation."""

    def __init__(self, trunk: MobileNetV2Features, input_size: int = 224) -> None:
        super().__init__()
        self.normalize = ImageNormalizer(input_size)
        self.trunk = trunk
        self.pool = GeM()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.pool(self.trunk(self.normalize(images)))
        return F.normalize(feats, dim=1)
