"""The Triton model configurations parse as Triton's own protobuf, and the GPU variants match the CPU ones.

Triton picks ``<model>/configs/gpu.pbtxt`` over ``config.pbtxt`` with ``--model-config-name=gpu``; a GPU variant
that drifted from the CPU one (another input shape, another output) would break clients only on GPU machines.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common.config import REPO_ROOT

MODELS = ("sieve_embedder", "sieve_classifier")
KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("model", MODELS)
def test_gpu_variant_serves_the_same_interface_on_gpu_instances(model: str) -> None:
    cpu = _parse(REPO_ROOT / "model_repo" / model / "config.pbtxt")
    gpu = _parse(REPO_ROOT / "model_repo" / model / "configs" / "gpu.pbtxt")
    assert gpu.name == cpu.name == model
    assert gpu.backend == cpu.backend
    assert gpu.max_batch_size == cpu.max_batch_size
    assert list(gpu.input) == list(cpu.input) and list(gpu.output) == list(cpu.output)
    assert gpu.version_policy == cpu.version_policy  # the trainer's "latest 1" promotion works the same
    assert [g.kind for g in cpu.instance_group] == [KIND_CPU]
    assert gpu.instance_group and all(g.kind == KIND_GPU for g in gpu.instance_group)
    assert gpu.HasField("dynamic_batching") and cpu.HasField("dynamic_batching")
    assert max(gpu.dynamic_batching.preferred_batch_size) <= gpu.max_batch_size
    # The same parameters, so a version behaves alike on both (values such as thread counts may differ).
    assert set(gpu.parameters) == set(cpu.parameters)
