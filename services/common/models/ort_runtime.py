"""onnxruntime sessions for the Triton models and the benchmarks; no torch here, so the classifier stays light."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort


def ort_session(model: bytes | Path | str, threads: int, gpu: bool = False, device_id: int = 0) -> ort.InferenceSession:
    """``threads`` intra-op threads and no inter-op pool (one model, one core budget).

    With ``gpu``, CUDA device ``device_id`` is used when this onnxruntime build has it (the onnxruntime-gpu
    wheel), else the CPU. Both Triton models build their sessions here, so a KIND_GPU instance behaves the same
    for each.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list[str | tuple[str, dict[str, Any]]] = ["CPUExecutionProvider"]
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers)


def triton_instance_device(args: dict[str, Any]) -> tuple[bool, int]:
    """(on a GPU?, which one) for a Triton Python-backend instance, from its ``initialize`` arguments."""
    return args.get("model_instance_kind") == "GPU", int(args.get("model_instance_device_id") or 0)
