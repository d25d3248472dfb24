"""Triton Python-backend model: ImageNet MobileNetV2 + GeM embedder (version 1, the baseline).

Runs on onnxruntime by default (about 3x torch's speed on a CPU core, bench/results/model.json); the
``backend`` parameter in config.pbtxt switches back to torch.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by the Triton Python backend

from services.common.models.gem import GeMEmbedder
from services.common.models.mobilenet_v2 import load_imagenet_trunk
from services.common.models.onnx_export import export_embedder
from services.common.models.ort_runtime import ort_session, triton_instance_device
from services.common.models.triton_batch import gather_inputs, respond_per_request


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        threads = int(params.get("threads", {}).get("string_value", "1"))
        self.backend = params.get("backend", {}).get("string_value", "onnxruntime")
        torch.set_num_threads(threads)
        model = GeMEmbedder(load_imagenet_trunk()).eval()
        if self.backend == "onnxruntime":
            # Exported in memory at load (about a second) from the same weights: nothing extra to ship or cache.
            gpu, device = triton_instance_device(args)
            self.session = ort_session(export_embedder(model), threads, gpu=gpu, device_id=device)
        elif self.backend == "torch":
            self.model = model
        else:
            raise ValueError(f"backend must be onnxruntime or torch, not {self.backend!r}")

    def _embed(self, images: np.ndarray) -> np.ndarray:
        if self.backend == "onnxruntime":
            return np.asarray(self.session.run(None, {"IMAGE": images})[0], dtype=np.float32)
        with torch.inference_mode():
            return self.model(torch.from_numpy(images)).numpy().astype(np.float32)

    def execute(self, requests: list[Any]) -> list[Any]:
        batch, sizes = gather_inputs(pb_utils, requests, "IMAGE")
        return respond_per_request(pb_utils, "EMBEDDING", self._embed(batch), sizes)
