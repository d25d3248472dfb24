"""Triton Python-backend model: Yahoo open_nsfw run with onnxruntime, preprocessed as the original Caffe model.

``model.int8.onnx`` beside this file is open_nsfw quantised by ``services.trainer.quantize`` (shipped only within
its tolerance of fp32, recorded in model_card.json); it is served unless the ``precision`` parameter or
``SIEVE_CLASSIFIER_PRECISION`` says fp32, or the file is missing. fp32 is the package's own network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Triton Python backend

from services.common.models.open_nsfw import caffe_input, network_path, nsfw_probability
from services.common.models.ort_runtime import ort_session, triton_instance_device
from services.common.models.triton_batch import gather_inputs, respond_per_request

MODEL_DIR = Path(__file__).resolve().parent


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        threads = int(params.get("ort_threads", {}).get("string_value", "2"))
        configured = params.get("precision", {}).get("string_value", "int8")
        precision = (os.environ.get("SIEVE_CLASSIFIER_PRECISION") or configured).lower()
        # A KIND_GPU instance (configs/gpu.pbtxt) runs on CUDA when this onnxruntime build has it.
        gpu, device = triton_instance_device(args)
        self.session = ort_session(network_path(MODEL_DIR, precision), threads, gpu=gpu, device_id=device)
        self.input_name = self.session.get_inputs()[0].name

    def execute(self, requests: list[Any]) -> list[Any]:
        images, sizes = gather_inputs(pb_utils, requests, "IMAGE")
        batch = np.stack([caffe_input(img) for img in images])
        scores = nsfw_probability(self.session.run(None, {self.input_name: batch})[0])
        return respond_per_request(pb_utils, "SCORES", scores, sizes)
