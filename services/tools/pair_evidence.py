"""What the network says about a pair, beside the numbers: torch-free, so ``sieve explain`` runs in the serving
install (the heat maps and the warp then stay empty, and the picture says why)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

NO_TORCH_NOTE = (
    "Grad-CAM and the spatial transformer's view need the network in torch, which the serving install leaves out: "
    "pip install -e '.[train]'. The scores, thresholds and keypoint matches below are the served ones."
)


@dataclass
class PairEvidence:
    similarity: float  # cosine of the two embeddings, computed in-process on the same artifact
    stn: bool  # the version has a spatial transformer (known only with torch: False without)
    stn_note: str  # why there is no warp to show, when there is none
    heat_view: NDArray[np.float32] | None = None  # (2, S, S) Grad-CAM in [0, 1] on what the backbone saw
    heat_input: NDArray[np.float32] | None = None  # (2, 256, 256) the same heat mapped back onto the input
    heat_peak: list[float] | None = None  # raw Grad-CAM maxima before normalisation (0: no positive evidence)
    theta: NDArray[np.float32] | None = None  # (2, 2, 3)
    warped: NDArray[np.uint8] | None = None  # (2, 256, 256, 3), the STN's "aligned view"
    stn_flags: list[dict[str, float]] | None = None

    @classmethod
    def without_network(cls, similarity: float) -> PairEvidence:
        return cls(similarity, stn=False, stn_note=NO_TORCH_NOTE)


def pose_of(theta: NDArray[np.float32]) -> dict[str, float]:
    """θ in words a reviewer can check against the picture: rotation, scale and shift of the sampled window."""
    a, b, tx = (float(v) for v in theta[0])
    c, d, ty = (float(v) for v in theta[1])
    return {
        "rotation_deg": round(math.degrees(math.atan2(c, a)), 2),
        "scale": round(math.sqrt(abs(a * d - b * c)), 3),
        "shift_x": round(tx, 3),
        "shift_y": round(ty, 3),
    }
