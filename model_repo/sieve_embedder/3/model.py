"""Triton Python-backend model: the STN embedder (version 2), exported by ``sieve train --ship``.

model.onnx runs with onnxruntime (about twice as fast on CPU as TorchScript, measured in model_card.json);
model.pt is the TorchScript original it was converted from and the fallback when onnxruntime or the ONNX file
is missing. Both hold the same fp16-stored weights; their outputs agree to ~1e-6.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Triton Python backend

from services.common.models.triton_batch import gather_inputs, respond_per_request

MODEL_DIR = Path(__file__).resolve().parent


def _onnx_runner(path: Path, threads: int, args: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    from services.common.models.ort_runtime import ort_session, triton_instance_device

    gpu, device = triton_instance_device(args)  # a KIND_GPU instance runs on its own CUDA device
    session = ort_session(path, threads, gpu=gpu, device_id=device)
    return lambda batch: session.run(["EMBEDDING"], {"IMAGE": batch})[0]


def _torchscript_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        model = torch.jit.load(str(path), map_location="cpu")
    model.float().eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    return run


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        threads = int(params.get("threads", params.get("torch_threads", {})).get("string_value", "1"))
        onnx_path = MODEL_DIR / "model.onnx"
        try:
            self.run = _onnx_runner(onnx_path, threads, args) if onnx_path.exists() else None
        except ImportError:
            self.run = None
        if self.run is None:
            self.run = _torchscript_runner(MODEL_DIR / "model.pt", threads)

    def execute(self, requests: list[Any]) -> list[Any]:
        batch, sizes = gather_inputs(pb_utils, requests, "IMAGE")
        return respond_per_request(pb_utils, "EMBEDDING", np.asarray(self.run(batch), dtype=np.float32), sizes)
