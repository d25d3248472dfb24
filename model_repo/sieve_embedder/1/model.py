"""Triton Python-backend model: ImageNet MobileNetV2 + GeM embedder (version 1, the baseline)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by the Triton Python backend

from services.common.models.gem import GeMEmbedder
from services.common.models.mobilenet_v2 import load_imagenet_trunk


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        threads = int(config.get("parameters", {}).get("torch_threads", {}).get("string_value", "2"))
        torch.set_num_threads(threads)
        self.model = GeMEmbedder(load_imagenet_trunk()).eval()

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [pb_utils.get_input_tensor_by_name(r, "IMAGE").as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.concatenate(arrays))).numpy().astype(np.float32)
        responses = []
        start = 0
        for n in sizes:
            tensor = pb_utils.Tensor("EMBEDDING", out[start:start + n])
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            start += n
        return responses
