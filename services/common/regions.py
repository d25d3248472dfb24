"""Fixed regions of an image, embedded beside the whole: a crop of a banked photo is near one of them even where
it is far from the whole (the issue-29 probe: crop µAP 0.72 -> 0.96 with these regions).

Cut from the model input (the 256-pixel square) rather than the original, so an image banked years ago can be
re-embedded by a new version from what the bank keeps. The same regions of an upload find a reference pasted
into it (a meme, a collage), where verification says the geometry agrees but the whole upload's cosine is low.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from services.common.inference import InferenceResult

Infer = Callable[[NDArray[np.uint8]], InferenceResult]

# (left, top, right, bottom) as fractions of the side: the centre at 70% and 50%, and the four 60% corners.
REGIONS: tuple[tuple[float, float, float, float], ...] = (
    (0.15, 0.15, 0.85, 0.85),
    (0.25, 0.25, 0.75, 0.75),
    (0.0, 0.0, 0.6, 0.6),
    (0.4, 0.0, 1.0, 0.6),
    (0.0, 0.4, 0.6, 1.0),
    (0.4, 0.4, 1.0, 1.0),
)


def region_views(pixels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """(n, s, s, 3) model inputs -> (n * len(REGIONS), s, s, 3): each image's regions in REGIONS' order, each
    enlarged back to the model's input size."""
    n, side = pixels.shape[0], pixels.shape[1]
    out = np.empty((n * len(REGIONS), side, side, 3), dtype=np.uint8)
    for i in range(n):
        image = Image.fromarray(np.ascontiguousarray(pixels[i]))
        for r, (left, top, right, bottom) in enumerate(REGIONS):
            box = (round(left * side), round(top * side), round(right * side), round(bottom * side))
            view = image.crop(box).resize((side, side), Image.Resampling.BILINEAR)
            out[i * len(REGIONS) + r] = np.asarray(view, dtype=np.uint8)
    return out


def embed_regions(
    infer: Infer, pixels: Sequence[NDArray[np.uint8]], model_version: str
) -> list[NDArray[np.float32]] | None:
    """Each image's regions embedded ((len(REGIONS), d), L2-normalised), in one call; None when another model
    version answered (a promotion in between: its space is not the references'). Raises what ``infer`` raises."""
    result = infer(region_views(np.stack(pixels)))
    if result.model_version != model_version:
        return None
    vectors = np.asarray(result.embeddings, dtype=np.float32)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return [vectors[i * len(REGIONS) : (i + 1) * len(REGIONS)] for i in range(len(pixels))]


def nearest_view(regions: NDArray[np.float32], views: NDArray[np.float32]) -> float:
    """The best cosine between any of an upload's regions and any view (or the one vector) of a reference."""
    return float(np.max(regions @ np.atleast_2d(views).T))
