from pathlib import Path

import numpy as np
import pytest

from services.common.config import DecisionSettings
from services.common.models.open_nsfw import INT8_NAME, caffe_input, fp32_path, network_path
from services.trainer.quantize import compare


def test_int8_serves_only_when_asked_for_and_shipped(tmp_path: Path) -> None:
    assert network_path(tmp_path, "int8") == fp32_path()  # not shipped: the package's fp32
    (tmp_path / INT8_NAME).write_bytes(b"onnx")
    assert network_path(tmp_path, "int8") == tmp_path / INT8_NAME
    assert network_path(tmp_path, "fp32") == fp32_path()
    with pytest.raises(ValueError, match="precision"):
        network_path(tmp_path, "int4")


def test_caffe_input_is_the_bgr_centre_crop() -> None:
    pixels = np.zeros((256, 256, 3), dtype=np.uint8)
    pixels[..., 2] = 200  # blue in RGB
    out = caffe_input(pixels)
    assert out.shape == (224, 224, 3)
    assert abs(float(out[..., 0].mean()) - (200 - 104)) < 3  # blue comes first, less its mean
    assert abs(float(out[..., 2].mean()) - (0 - 123)) < 3


def test_agreeing_decisions_do_not_hide_scores_that_moved() -> None:
    """No image near a threshold: every decision agrees, yet scores moved by 0.2 must fail the gate."""
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.0, 0.3, 500).astype(np.float32)
    noisy = np.clip(reference + rng.normal(0, 0.08, 500), 0, 0.39).astype(np.float32)
    verdict = compare(reference, noisy, DecisionSettings())
    assert min(verdict["decision_agreement"].values()) == 1.0
    assert verdict["within_tolerance"] is False
    assert compare(reference, reference + 0.001, DecisionSettings())["within_tolerance"] is True
