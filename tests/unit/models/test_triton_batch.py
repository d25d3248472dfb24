"""Triton's dynamic batching helper: requests go in as one batch and each gets exactly its own rows back.

``pb_utils`` exists only inside Triton's stub, so a minimal stand-in carries tensors here; the real server runs
these helpers in tests/integration/test_triton_models.py and test_embedder_v2_parity.py."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from services.common.models.triton_batch import gather_inputs, respond_per_request


@dataclass
class _Tensor:
    name: str
    array: np.ndarray

    def as_numpy(self) -> np.ndarray:
        return self.array


@dataclass
class _Response:
    output_tensors: list[_Tensor]


def _pb_utils() -> Any:
    return SimpleNamespace(
        get_input_tensor_by_name=lambda request, name: request[name],
        Tensor=_Tensor,
        InferenceResponse=_Response,
    )


def test_requests_are_batched_in_order_and_answered_with_their_own_rows() -> None:
    pb = _pb_utils()
    requests = [{"IMAGE": _Tensor("IMAGE", np.full((n, 2, 2, 3), n, np.uint8))} for n in (2, 1, 3)]
    batch, sizes = gather_inputs(pb, requests, "IMAGE")
    assert sizes == [2, 1, 3] and batch.shape == (6, 2, 2, 3) and batch.flags["C_CONTIGUOUS"]
    assert batch[:, 0, 0, 0].tolist() == [2, 2, 1, 3, 3, 3]
    out = np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    responses = respond_per_request(pb, "EMBEDDING", out, sizes)
    assert [r.output_tensors[0].name for r in responses] == ["EMBEDDING"] * 3
    rows = [r.output_tensors[0].array[:, 0].tolist() for r in responses]
    assert rows == [[0.0, 1.0], [2.0], [3.0, 4.0, 5.0]]
